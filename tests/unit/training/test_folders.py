"""Labelled folders and leakage-free splits, on FracAtlas and on small folders made here."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.peers import SHARED
from triage_node.errors import DatasetFolderError
from triage_node.training.folders import block_folds, block_split, load_folder

FRACATLAS = SHARED / "data" / "fracatlas"


def block_of(example_id: str, ids_in_order: list[str], size: int) -> int:
    return ids_in_order.index(example_id) // size


@pytest.mark.skipif(not FRACATLAS.is_dir(), reason=f"{FRACATLAS} not found")
def test_fracatlas_loads_with_labels_and_boxes() -> None:
    examples = load_folder(FRACATLAS)
    assert len(examples) == 3477
    assert sum(e.label for e in examples) == 609
    with_boxes = [e for e in examples if e.boxes]
    assert with_boxes and all(e.label == 1 for e in with_boxes)
    assert examples[0].image_id < examples[1].image_id  # natural order


@pytest.mark.skipif(not FRACATLAS.is_dir(), reason=f"{FRACATLAS} not found")
def test_block_split_keeps_blocks_whole_and_is_reproducible() -> None:
    examples = load_folder(FRACATLAS)
    ids = [e.image_id for e in examples]
    split = block_split(examples, block_size=20, seed=7)
    assert sum(len(v) for v in split.values()) == len(examples)
    blocks = {name: {block_of(e.image_id, ids, 20) for e in part} for name, part in split.items()}
    assert not blocks["train"] & blocks["validation"]
    assert not blocks["train"] & blocks["test"]
    assert not blocks["validation"] & blocks["test"]
    assert 0.65 < len(split["train"]) / len(examples) < 0.75
    again = block_split(examples, block_size=20, seed=7)
    assert [e.image_id for e in again["validation"]] == [e.image_id for e in split["validation"]]
    other = block_split(examples, block_size=20, seed=8)
    assert [e.image_id for e in other["validation"]] != [e.image_id for e in split["validation"]]


def make_class_folders(root: Path, fractured: int, normal: int) -> Path:
    for name, count in (("fractured", fractured), ("normal", normal)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"img{i:03d}.png").write_bytes(b"png")
    return root


def test_class_folders_and_k_folds(tmp_path: Path) -> None:
    examples = load_folder(make_class_folders(tmp_path / "data", 30, 50))
    assert len(examples) == 80 and sum(e.label for e in examples) == 30
    folds = block_folds(examples, 5, block_size=4, seed=1)
    validation_ids = [e.image_id for _, val in folds for e in val]
    assert sorted(validation_ids) == sorted(e.image_id for e in examples)  # each exactly once
    for train, val in folds:
        assert not {e.image_id for e in train} & {e.image_id for e in val}


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "expected labels.csv"),
        ({"labels.csv": "image_id,label\na.jpg,1\n"}, "missing column\\(s\\) fractured"),
        ({"labels.csv": "image_id,fractured\na.jpg,1\n"}, "image .* does not exist"),
        ({"labels.csv": "image_id,fractured\na.jpg,yes\n", "images/a.jpg": "x"}, "must be 0 or 1"),
        ({"labels.csv": "image_id,fractured\na.jpg,1\n", "images/a.jpg": "x"}, "needs both"),
        (
            {
                "labels.csv": "image_id,fractured\na.jpg,1\nb.jpg,0\n",
                "images/a.jpg": "x",
                "images/b.jpg": "x",
                "boxes.csv": "image_id,x0,y0,x1,y1\na.jpg,1,2,three,4\n",
            },
            "box coordinates must be numbers",
        ),
    ],
)
def test_malformed_folders_fail_clearly(
    tmp_path: Path, files: dict[str, str], message: str
) -> None:
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    with pytest.raises(DatasetFolderError, match=message):
        load_folder(tmp_path)
