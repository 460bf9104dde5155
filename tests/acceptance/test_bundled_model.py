"""The bundled model, models/fracture-v1: loads, is what its manifest says, and runs end to end."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.peers import require_shared_dicom, triage_node_command
from triage_node.config import WorkerConfig
from triage_node.infer import Model
from triage_node.model import load_manifest

BUNDLED = Path(__file__).resolve().parents[2] / "models" / "fracture-v1"


def test_manifest_checksum_size_and_recorded_metrics() -> None:
    manifest = load_manifest(BUNDLED)  # verifies the SHA-256 of model.onnx
    assert manifest.name == "fracture-v1"
    assert manifest.onnx_path.stat().st_size < 50 * 2**20
    assert manifest.input.size == 320 and manifest.input.channels == 1
    assert WorkerConfig().model_dir == Path("models/fracture-v1")  # what `make serve` uses
    validation = manifest.metrics["validation"]
    low, high = validation["auroc_ci95"]
    assert low <= validation["auroc"] <= high
    points = manifest.operating_points
    assert points["high_sensitivity"].threshold <= points["high_specificity"].threshold
    assert points["high_sensitivity"].sensitivity is not None
    assert points["high_sensitivity"].sensitivity >= 0.9
    assert points["high_specificity"].specificity is not None
    assert points["high_specificity"].specificity >= 0.9
    assert manifest.metrics["export_parity_max_abs_diff"] < 1e-4
    assert manifest.training_data["licence"] == "CC BY 4.0"
    assert "Abedeen" in manifest.training_data["citation"]


def test_runs_with_batches_and_a_cam_per_image() -> None:
    import numpy as np

    model = Model(BUNDLED, intra_op_threads=1)
    batch = np.zeros((3, 1, 320, 320), np.float32)
    probs, cams, _ = model.run(batch)
    assert probs.shape == (3,) and cams.shape == (3, 10, 10)
    assert np.all((probs >= 0) & (probs <= 1))


def test_infer_command_on_shared_radiographs() -> None:
    shared = require_shared_dicom()
    files = [
        shared / "CR_RG3_extremityAP_mono1_10bit_JPEG-lossless.dcm",
        shared / "CR_RG2_hip_mono2_10bit_uncompressed.dcm",
    ]
    result = subprocess.run(
        [triage_node_command(), "infer", "--model", str(BUNDLED), "--json", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"]["name"] == "fracture-v1"
    images = [image for study in report["studies"] for image in study["images"]]
    assert len(images) == 2
    for image in images:
        assert 0 <= image["probability"] <= 1


@pytest.mark.parametrize("name", ["validation", "test"])
def test_recorded_evaluations_match_the_manifest(name: str) -> None:
    """The figures in the model card come from `triage-node evaluate`; they are kept beside it."""
    document = json.loads((BUNDLED / "evaluation" / name / "evaluation.json").read_text())
    manifest = load_manifest(BUNDLED)
    assert document["data"]["split"] == name
    assert document["auroc"] == pytest.approx(manifest.metrics[name]["auroc"], abs=1e-3)
    assert (BUNDLED / "evaluation" / name / "roc.png").is_file()
    if name == "validation":  # the thresholds reach their targets where they were chosen
        points = document["operating_points"]
        assert points["high_sensitivity"]["sensitivity"] >= 0.9
        assert points["high_specificity"]["specificity"] >= 0.9
        assert points["high_sensitivity"]["threshold"] == pytest.approx(
            manifest.operating_points["high_sensitivity"].threshold, abs=1e-6
        )
