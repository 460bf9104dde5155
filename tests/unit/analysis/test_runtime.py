"""Manifest validation and the ONNX Runtime wrapper, on small real ONNX models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.support.onnx_models import write_model_dir
from triage_node.analysis.manifest import load_manifest
from triage_node.analysis.preprocess import Geometry
from triage_node.analysis.runtime import ModelSession, cam_peak, choose_providers
from triage_node.errors import ModelError


def edit_manifest(directory: Path, change) -> None:  # type: ignore[no-untyped-def]
    path = directory / "manifest.json"
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def test_outputs_have_the_declared_shapes_and_batching_is_consistent(tmp_path: Path) -> None:
    model = ModelSession(write_model_dir(tmp_path / "m", size=32))
    rng = np.random.default_rng(1)
    batch = rng.normal(size=(8, 1, 32, 32)).astype(np.float32)
    probs, cams, ms = model.run(batch)
    assert probs.shape == (8,) and cams.shape == (8, 32, 32) and ms > 0
    assert np.all((probs > 0) & (probs < 1))
    single, single_cam, _ = model.run(batch[3:4])
    np.testing.assert_allclose(single[0], probs[3], rtol=1e-5)
    np.testing.assert_allclose(single_cam[0], cams[3], rtol=1e-4, atol=1e-5)
    # The CAM is exact: the probability is the sigmoid of the CAM's mean.
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-cams.mean(axis=(1, 2)))), rtol=1e-4)
    assert model.provider == "CPUExecutionProvider"


def test_provider_choice_prefers_cuda_and_always_keeps_cpu() -> None:
    assert choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert choose_providers(["TensorrtExecutionProvider"]) == ["CPUExecutionProvider"]


def test_sha256_mismatch_refuses_to_load(tmp_path: Path) -> None:
    directory = write_model_dir(tmp_path / "m")
    with open(directory / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelError, match="does not match the manifest"):
        ModelSession(directory)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["input"].pop("size"), "input.size: missing"),
        (lambda d: d["input"].update(size="big"), "input.size: must be a number"),
        (lambda d: d["input"].update(resize="crop"), "input.resize: must be one of"),
        (
            lambda d: d["operating_points"]["high_specificity"].update(threshold=1.5),
            "operating_points.high_specificity.threshold",
        ),
        (lambda d: d["onnx"].update(sha256="abc"), "onnx.sha256: must be 64 hexadecimal"),
        (lambda d: d["onnx"].update(file="../x.onnx"), "onnx.file: must be a file name"),
        (lambda d: d.update(labels=["only"]), "labels: must name"),
        (lambda d: d["selection"].update(modalities="CR"), "selection.modalities"),
    ],
)
def test_manifest_errors_name_the_field(tmp_path: Path, change, message: str) -> None:  # type: ignore[no-untyped-def]
    directory = write_model_dir(tmp_path / "m")
    edit_manifest(directory, change)
    with pytest.raises(ModelError, match=message):
        load_manifest(directory)


def test_graph_that_does_not_match_the_manifest_is_refused(tmp_path: Path) -> None:
    directory = write_model_dir(tmp_path / "m", size=32)
    edit_manifest(directory, lambda d: d["input"].update(size=64))
    with pytest.raises(ModelError, match="does not match the manifest"):
        ModelSession(directory)
    directory = write_model_dir(tmp_path / "n", size=32)
    edit_manifest(directory, lambda d: d["onnx"]["outputs"].update(cam="heatmap"))
    with pytest.raises(ModelError, match="no output named 'heatmap'"):
        ModelSession(directory)


def test_missing_model_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"is .* a model directory"):
        load_manifest(tmp_path / "nothing")


def test_cam_peak_maps_back_through_the_letterbox() -> None:
    # A 200 x 100 image letterboxed into 64: scale 0.32, padded 16 px left and right.
    geometry = Geometry(rows=200, columns=100, scale_y=0.32, scale_x=0.32, pad_top=0, pad_left=16)
    cam = np.zeros((16, 16), dtype=np.float32)  # CAM at a quarter of the input resolution
    cam[12, 5] = 3.0  # in the image area (columns 4..11 of the CAM)
    cam[0, 0] = 9.0  # in the padding: must be ignored
    peak = cam_peak(cam, geometry, input_size=64)
    assert abs(peak.row - (12.5 * 4) / 0.32) <= 1
    assert abs(peak.column - ((5.5 * 4) - 16) / 0.32) <= 1
    assert peak.value == 1.0 and 0 < peak.area_fraction < 0.1


def test_scope_guard_output_and_threshold(tmp_path: Path) -> None:
    model = ModelSession(write_model_dir(tmp_path / "m", size=32, ood_threshold=0.5))
    assert model.manifest.ood_output == "ood_score" and model.manifest.ood_threshold == 0.5
    batch = np.stack([np.zeros((1, 32, 32)), np.full((1, 32, 32), 2.0)]).astype(np.float32)
    outputs = model.outputs(batch)
    assert outputs.ood_scores is not None
    np.testing.assert_allclose(outputs.ood_scores, [0.0, 2.0], atol=1e-6)
    assert model.out_of_scope(float(outputs.ood_scores[0])) is None
    refusal = model.out_of_scope(float(outputs.ood_scores[1]))
    assert refusal is not None and refusal.startswith("out of scope") and "2.00 > 0.50" in refusal
    assert model.out_of_scope(float("nan")) is not None  # a broken score never passes
    plain = ModelSession(write_model_dir(tmp_path / "plain", size=32))
    assert plain.outputs(batch).ood_scores is None and plain.out_of_scope(None) is None


def test_scope_guard_threshold_and_output_go_together(tmp_path: Path) -> None:
    directory = write_model_dir(tmp_path / "m", size=32, ood_threshold=0.5)
    edit_manifest(directory, lambda d: d.pop("ood"))
    with pytest.raises(ModelError, match=r"ood\.threshold"):
        load_manifest(directory)
    directory = write_model_dir(tmp_path / "n", size=32)
    edit_manifest(directory, lambda d: d.update(scope={"body_parts": "HAND"}))
    with pytest.raises(ModelError, match="scope"):
        load_manifest(directory)
