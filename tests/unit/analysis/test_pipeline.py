"""The analysis pipeline skips what the model is not for, with the reason: by tags before any
pixel is decoded, and by the model's image guard after inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.support.onnx_models import write_model_dir
from tests.support.synth import radiograph
from triage_node.analysis.pipeline import ImageSource, analyse
from triage_node.analysis.runtime import ModelSession
from triage_node.analysis.scope import FRACATLAS_SCOPE


def source(directory: Path, index: int, **values: str) -> ImageSource:
    """A synthetic radiograph with these header values ('' removes the attribute)."""
    ds = radiograph(64, 48, seed=index)
    for keyword, value in values.items():
        if value:
            setattr(ds, keyword, value)
        elif keyword in ds:
            delattr(ds, keyword)
    path = directory / f"{index}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return ImageSource(index, str(ds.SOPInstanceUID), path)


def test_tags_then_guard(tmp_path: Path) -> None:
    model_dir = write_model_dir(
        tmp_path / "model", size=32, ood_threshold=0.5, scope=FRACATLAS_SCOPE.to_document()
    )
    model = ModelSession(model_dir, intra_op_threads=1)
    sources = [
        source(tmp_path, 0, BodyPartExamined="HAND"),
        source(tmp_path, 1, BodyPartExamined="CHEST"),
        source(tmp_path, 2, BodyPartExamined="", StudyDescription="XR SKULL"),
        source(tmp_path, 3, BodyPartExamined=""),
    ]
    pictures: dict[str, np.ndarray] = {}
    analysis = analyse(sources, model, pictures=pictures)
    reasons = {k.instance_id: k.reason for k in analysis.skipped}
    assert [i.instance_id for i in analysis.images] == [0, 3]
    assert set(pictures) == {i.sop_instance_uid for i in analysis.images}
    assert reasons[1].startswith("out of scope: Body Part Examined CHEST")
    assert reasons[2].startswith("out of scope: the study/series description")

    skipped = analyse(sources[3:], model, unlabelled="skip")
    assert not skipped.images and "policy: skip" in skipped.skipped[0].reason

    # A window that saturates the image: its mean (the tiny graph's score) is 1.0 > 0.5.
    bright = source(tmp_path, 4, BodyPartExamined="HAND", WindowCenter="10", WindowWidth="20")
    guarded = analyse([bright], model, pictures=pictures)
    assert not guarded.images and guarded.outcome.value == "skipped"
    assert "scope guard score" in guarded.skipped[0].reason


def test_infer_names_each_file_even_when_two_share_a_sop_instance_uid(tmp_path: Path) -> None:
    from triage_node.analysis.files import analyse_files
    from triage_node.config import WorkerConfig

    model_dir = write_model_dir(tmp_path / "model", size=32, scope=FRACATLAS_SCOPE.to_document())
    folder = tmp_path / "files"
    folder.mkdir()
    first = radiograph(64, 48, seed=1)
    first.BodyPartExamined = "HAND"
    first.save_as(folder / "a.dcm", enforce_file_format=True)
    first.BodyPartExamined = "CHEST"  # the same SOP Instance UID, another file
    first.save_as(folder / "b.dcm", enforce_file_format=True)
    report = analyse_files([folder], model_dir, WorkerConfig(intra_op_threads=1))
    [study] = report["studies"]
    assert [Path(i["file"]).name for i in study["images"]] == ["a.dcm"]
    assert [Path(k["file"]).name for k in study["skipped"]] == ["b.dcm"]
