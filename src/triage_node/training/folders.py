"""Labelled radiograph folders for training and evaluation, and leakage-free splits.

Three layouts are read:

- ``labels.csv`` + ``images/`` as in FracAtlas: columns ``image_id`` and ``fractured`` (0/1),
  optional ``boxes.csv`` (``image_id, x0, y0, x1, y1`` in pixels, 0..n rows per image);
- ``fractured/`` and ``normal/`` folders of images;
- DICOM files with a ``labels.csv`` whose ``image_id`` names the files (relative paths).

There are no patient ids, so splits keep blocks of consecutive image ids together (multi-view
studies sit next to each other), shuffled with a fixed seed.
"""

from __future__ import annotations

import csv
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from triage_node.errors import DatasetFolderError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm")


# Model-input pixels: the tolerant CAM localisation measure (peak within this of a box), the
# same in training's validation and in ``evaluate``.
NEAR_BOX_PIXELS = 16


@dataclass(frozen=True, slots=True)
class Box:
    x0: float
    y0: float
    x1: float
    y1: float

    def contains(self, x: float, y: float) -> bool:
        return self.x0 <= x <= self.x1 and self.y0 <= y <= self.y1


@dataclass(frozen=True, slots=True)
class Example:
    image_id: str
    path: Path
    label: int  # 1 = fracture
    boxes: tuple[Box, ...] = ()


def _natural_key(image_id: str) -> tuple[str, int, str]:
    match = re.search(r"(\d+)", image_id)
    if match is None:
        return (image_id, -1, "")
    return (image_id[: match.start()], int(match.group(1)), image_id[match.end() :])


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetFolderError(f"{path}: cannot be read: {exc}") from None
    if not rows:
        raise DatasetFolderError(f"{path}: has no rows")
    missing = [c for c in required if c not in rows[0]]
    if missing:
        raise DatasetFolderError(f"{path}: missing column(s) {', '.join(missing)}")
    return rows


def _boxes(path: Path) -> dict[str, list[Box]]:
    if not path.exists():
        return {}
    boxes: dict[str, list[Box]] = {}
    for line, row in enumerate(_read_csv(path, ("image_id", "x0", "y0", "x1", "y1")), start=2):
        try:
            box = Box(float(row["x0"]), float(row["y0"]), float(row["x1"]), float(row["y1"]))
        except ValueError:
            raise DatasetFolderError(f"{path}:{line}: box coordinates must be numbers") from None
        boxes.setdefault(row["image_id"], []).append(box)
    return boxes


def _from_labels_csv(directory: Path) -> list[Example]:
    labels = directory / "labels.csv"
    images = directory / "images" if (directory / "images").is_dir() else directory
    boxes = _boxes(directory / "boxes.csv")
    examples = []
    for line, row in enumerate(_read_csv(labels, ("image_id", "fractured")), start=2):
        if row["fractured"] not in ("0", "1"):
            raise DatasetFolderError(f"{labels}:{line}: fractured must be 0 or 1")
        path = images / row["image_id"]
        if not path.is_file():
            raise DatasetFolderError(f"{labels}:{line}: image {path} does not exist")
        label = int(row["fractured"])
        examples.append(
            Example(row["image_id"], path, label, tuple(boxes.get(row["image_id"], ())))
        )
    return examples


def _from_class_folders(directory: Path) -> list[Example]:
    examples = []
    for name, label in (("fractured", 1), ("normal", 0)):
        for path in sorted((directory / name).rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                image_id = f"{name}/{path.relative_to(directory / name)}"
                examples.append(Example(image_id, path, label))
    return examples


def load_folder(directory: Path) -> list[Example]:
    """All labelled examples of *directory*, in natural image-id order."""
    if not directory.is_dir():
        raise DatasetFolderError(f"{directory} is not a directory")
    if (directory / "labels.csv").is_file():
        examples = _from_labels_csv(directory)
    elif (directory / "fractured").is_dir() and (directory / "normal").is_dir():
        examples = _from_class_folders(directory)
    else:
        raise DatasetFolderError(
            f"{directory}: expected labels.csv (with images/), or fractured/ and normal/ folders"
        )
    if not examples:
        raise DatasetFolderError(f"{directory}: no images found")
    if len({e.label for e in examples}) < 2:
        raise DatasetFolderError(f"{directory}: needs both fractured and normal images")
    return sorted(examples, key=lambda e: _natural_key(e.image_id))


def _blocks(examples: Sequence[Example], block_size: int, seed: int) -> list[list[Example]]:
    if block_size < 1:
        raise ValueError("block_size must be at least 1")
    ordered = sorted(examples, key=lambda e: _natural_key(e.image_id))
    blocks = [list(ordered[i : i + block_size]) for i in range(0, len(ordered), block_size)]
    random.Random(seed).shuffle(blocks)  # noqa: S311 - reproducible splits, not secrets
    return blocks


def block_split(
    examples: Sequence[Example],
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    *,
    block_size: int = 20,
    seed: int = 0,
) -> dict[str, list[Example]]:
    """Train/validation/test split by shuffled blocks of consecutive image ids."""
    if abs(sum(fractions) - 1) > 1e-9 or min(fractions) < 0:
        raise ValueError("fractions must be non-negative and sum to 1")
    blocks = _blocks(examples, block_size, seed)
    total = sum(len(b) for b in blocks)
    names = ("train", "validation", "test")
    split: dict[str, list[Example]] = {name: [] for name in names}
    goal_train = fractions[0] * total
    goal_val = goal_train + fractions[1] * total
    assigned = 0
    for block in blocks:
        name = "train" if assigned < goal_train else "validation" if assigned < goal_val else "test"
        split[name].extend(block)
        assigned += len(block)
    return split


def block_folds(
    examples: Sequence[Example], k: int, *, block_size: int = 20, seed: int = 0
) -> list[tuple[list[Example], list[Example]]]:
    """k (train, validation) pairs; every block is in exactly one validation fold."""
    if k < 2:
        raise ValueError("k must be at least 2")
    blocks = _blocks(examples, block_size, seed)
    folds: list[list[Example]] = [[] for _ in range(k)]
    for index, block in enumerate(blocks):
        folds[index % k].extend(block)
    return [
        ([e for j, fold in enumerate(folds) if j != i for e in fold], folds[i]) for i in range(k)
    ]
