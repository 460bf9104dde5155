"""The bundled models: fracture-v5 (what `make serve` uses), fracture-v4, fracture-v3,
fracture-v2 and fracture-v1 (kept for comparison) load, are what their manifests say, and run
end to end; the default model's scope gating holds on the shared radiographs."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.support.peers import SHARED, require_shared_dicom, triage_node_command
from triage_node.analysis.manifest import load_manifest
from triage_node.analysis.runtime import ModelSession
from triage_node.config import WorkerConfig

MODELS = Path(__file__).resolve().parents[2] / "models"
V1, V2, V3, V4, V5 = (MODELS / f"fracture-v{n}" for n in (1, 2, 3, 4, 5))
DEFAULT = V5  # what `make serve` uses
BUNDLED = [pytest.param(d, id=d.name) for d in (V1, V2, V3, V4, V5)]
PRETRAINED = [pytest.param(d, id=d.name) for d in (V2, V3, V4, V5)]
# the split each model's operating points were chosen on, and its recorded evaluations (a model
# refitted on train + validation has no unseen validation split: the folds' held-out logits)
CHOSEN_ON = {V5: "out_of_fold"}
RECORDED = [
    pytest.param(d, split, id=f"{d.name}-{split}")
    for d in (V1, V2, V3, V4, V5)
    for split in ("validation", "test")
    if not (split == "validation" and d in CHOSEN_ON)
]
IN_SCOPE = {"HIP", "EXTREMITY"}  # the shared radiographs' body parts that FracAtlas covers


def test_make_serve_uses_fracture_v5() -> None:
    assert WorkerConfig().model_dir == Path("models/fracture-v5")


def test_fracture_v5_was_refitted_on_train_and_validation_and_calibrated_out_of_fold() -> None:
    document = json.loads((V5 / "manifest.json").read_text())
    recipe = document["training"]["recipe"]
    assert recipe["epoch_kept"] == "last" and recipe["best_epoch"] == recipe["epochs"] == 10
    assert recipe["operating_points_chosen_on"] == "out_of_fold"
    assert document["training_data"]["trained_on"] == ["train", "validation"]
    assert "held-out logits" in document["calibration"]["method"]
    held_out = document["metrics"]["out_of_fold"]
    split = document["training_data"]["split"]
    assert held_out["images"] == split["train"]["images"] + split["validation"]["images"]
    assert document["ood"]["cross_fitted_pass_rate"] == 1.0
    log = [json.loads(line) for line in (V5 / "train-log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == list(range(1, 11))
    assert all("validation_auroc" not in e for e in log)  # nothing was held out


def test_fracture_v4_kept_its_last_epoch_of_the_count_cross_validation_chose() -> None:
    recipe = json.loads((V4 / "manifest.json").read_text())["training"]["recipe"]
    assert recipe["epoch_kept"] == "last" and recipe["best_epoch"] == recipe["epochs"] == 10
    log = [json.loads(line) for line in (V4 / "train-log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == list(range(1, 11))


@pytest.mark.parametrize("directory", BUNDLED)
def test_manifest_checksum_size_and_recorded_metrics(directory: Path) -> None:
    manifest = load_manifest(directory)  # verifies the SHA-256 of model.onnx
    assert manifest.name == directory.name
    assert manifest.onnx_path.stat().st_size < 50 * 2**20
    assert manifest.input.size in (320, 384) and manifest.input.channels == 1
    validation = manifest.metrics[CHOSEN_ON.get(directory, "validation")]
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


@pytest.mark.parametrize("directory", PRETRAINED)
def test_the_pretrained_models_are_calibrated_and_scoped(directory: Path) -> None:
    manifest = load_manifest(directory)
    document = json.loads((directory / "manifest.json").read_text())
    weights = document["network"]["initial_weights"]
    assert "EfficientNet-Lite" in weights["origin"] and weights["licence"].startswith("Apache-2.0")
    assert "research" in weights["licence"]  # ImageNet's terms
    assert manifest.calibration["method"].startswith("Platt")
    assert manifest.ood_output == "ood_score" and manifest.ood_threshold is not None
    assert "hand/wrist/fingers" in manifest.scope.regions


@pytest.mark.parametrize("directory", BUNDLED)
def test_runs_with_batches_and_a_cam_per_image(directory: Path) -> None:
    model = ModelSession(directory, intra_op_threads=1)
    size = load_manifest(directory).input.size
    batch = np.zeros((3, 1, size, size), np.float32)
    probs, cams, _ = model.run(batch)
    assert probs.shape == (3,) and cams.shape == (3, size // 32, size // 32)
    assert np.all((probs >= 0) & (probs <= 1))


def _infer(directory: Path, *paths: Path) -> dict:  # type: ignore[type-arg]
    result = subprocess.run(
        [triage_node_command(), "infer", "--model", str(directory), "--json", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report: dict = json.loads(result.stdout)  # type: ignore[type-arg]
    return report


def test_infer_command_on_shared_radiographs_v1() -> None:
    shared = require_shared_dicom()
    files = [
        shared / "CR_RG3_extremityAP_mono1_10bit_JPEG-lossless.dcm",
        shared / "CR_RG2_hip_mono2_10bit_uncompressed.dcm",
    ]
    report = _infer(V1, *files)
    assert report["model"]["name"] == "fracture-v1"
    images = [image for study in report["studies"] for image in study["images"]]
    assert len(images) == 2
    for image in images:
        assert 0 <= image["probability"] <= 1


def test_the_default_model_analyses_what_it_is_for_and_says_why_it_skips_the_rest() -> None:
    """Every shared file: the in-scope radiographs with pixels analysed; every other body part,
    every non-radiograph and every broken file skipped (or unreadable) with a reason."""
    shared = require_shared_dicom()
    with open(shared / "manifest.csv", newline="") as handle:
        rows = {row["file"]: row for row in csv.DictReader(handle)}
    report = _infer(DEFAULT, shared)
    analysed = {Path(i["file"]).name for s in report["studies"] for i in s["images"]}
    skipped = {Path(k["file"]).name: k["reason"] for s in report["studies"] for k in s["skipped"]}
    unreadable = {Path(u["file"]).name: u["reason"] for u in report["unreadable"]}
    for name, row in rows.items():
        radiograph = row["Modality"] in ("CR", "DX") and row["HasPixelData"] == "True"
        wanted = (
            radiograph
            and row["BodyPartExamined"] in IN_SCOPE
            and row["category"] in ("radiograph",)
        )
        if wanted:
            assert name in analysed, f"{name}: {skipped.get(name) or unreadable.get(name)}"
            continue
        assert name not in analysed, f"{name} ({row['BodyPartExamined']}) was analysed"
        reason = skipped.get(name) or unreadable.get(name)
        assert reason, f"{name}: no reason given"
        if name in skipped and row["BodyPartExamined"] in ("CHEST", "THORAX", "CSPINE"):
            assert skipped[name].startswith("out of scope"), skipped[name]
    assert len(analysed) == sum(
        r["Modality"] in ("CR", "DX")
        and r["BodyPartExamined"] in IN_SCOPE
        and r["HasPixelData"] == "True"
        and r["category"] == "radiograph"
        for r in rows.values()
    )


@pytest.mark.parametrize(("directory", "name"), RECORDED)
def test_recorded_evaluations_match_the_manifest(directory: Path, name: str) -> None:
    """The figures in the model card come from `triage-node evaluate`; they are kept beside it."""
    document = json.loads((directory / "evaluation" / name / "evaluation.json").read_text())
    manifest = load_manifest(directory)
    assert document["data"]["split"] == name
    assert document["auroc"] == pytest.approx(manifest.metrics[name]["auroc"], abs=1e-3)
    assert (directory / "evaluation" / name / "roc.png").is_file()
    if name == "validation":  # the thresholds reach their targets where they were chosen
        points = document["operating_points"]
        assert points["high_sensitivity"]["sensitivity"] >= 0.9
        assert points["high_specificity"]["specificity"] >= 0.9
        assert points["high_sensitivity"]["threshold"] == pytest.approx(
            manifest.operating_points["high_sensitivity"].threshold, abs=1e-6
        )


FRACATLAS = SHARED / "data" / "fracatlas"
REGION_TERMS = {"hand": "HAND", "leg": "LEG", "hip": "HIP", "shoulder": "SHOULDER"}


@pytest.mark.skipif(not (FRACATLAS / "labels.csv").is_file(), reason=f"{FRACATLAS} not found")
def test_the_default_model_analyses_in_scope_fracatlas_test_images_as_dicom(
    tmp_path: Path,
) -> None:
    """Test-split images wrapped as DX instances, Body Part Examined from labels.csv's region
    flags (none for 'mixed': the unlabelled policy, analyse): the tags admit every one and the
    image guard passes at least 97% of them (its threshold was chosen without them)."""
    from pydicom.uid import generate_uid

    from tests.support.synth import dx_from_picture
    from triage_node.training.evaluate import select
    from triage_node.training.folders import load_folder

    with open(FRACATLAS / "labels.csv", newline="") as handle:
        regions = {
            row["image_id"]: next((t for k, t in REGION_TERMS.items() if row[k] == "1"), "")
            for row in csv.DictReader(handle)
        }
    manifest = load_manifest(DEFAULT)
    test = select(load_folder(FRACATLAS), "test", manifest.training_data["split"])[::4]
    study_uid, series_uid = generate_uid(), generate_uid()
    for number, example in enumerate(test, 1):
        ds = dx_from_picture(example.path, study_uid, series_uid, number, body_part="HAND")
        if regions[example.image_id]:
            ds.BodyPartExamined = regions[example.image_id]
        else:
            del ds.BodyPartExamined
        ds.save_as(tmp_path / f"{number:04d}.dcm", enforce_file_format=True)
    report = _infer(DEFAULT, tmp_path)
    [study] = report["studies"]
    reasons = [k["reason"] for k in study["skipped"]]
    assert all("scope guard" in r for r in reasons), reasons  # no header refused one
    assert len(study["images"]) >= 0.97 * len(test), reasons
