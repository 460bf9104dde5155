"""``triage-node evaluate``: how well a model directory does on a labelled folder.

Everything runs through the run-time path (ONNX Runtime via
:class:`triage_node.analysis.runtime.ModelSession`, the runtime's resize and normalisation), so the
figures describe the model as the node runs it:
AUROC with its DeLong 95% CI, sensitivity and specificity (Wilson 95% intervals) at each
operating point of the manifest and at the Youden threshold, the ROC curve, calibration (a table,
the expected calibration error beside the error sampling alone would give exactly calibrated
probabilities on the same images, and a reliability diagram), CAM localisation (the share of
fractured images with boxes whose CAM peak lies inside a fracture box, and within 16
model-input pixels of one), and how many images the model's scope guard would let through.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from triage_node.analysis.preprocess import Geometry, model_input
from triage_node.analysis.runtime import ModelSession, cam_peak
from triage_node.errors import DatasetFolderError
from triage_node.training.calibration import ece_if_calibrated, expected_calibration_error
from triage_node.training.folders import NEAR_BOX_PIXELS, Box, Example, block_split, load_folder
from triage_node.training.imagefile import read_display
from triage_node.training.plots import reliability_png, roc_png
from triage_node.training.statistics import (
    auroc,
    calibration_table,
    confusion,
    roc_points,
    threshold_for_sensitivity,
    threshold_for_specificity,
    wilson_interval,
    youden_threshold,
)

SPLITS = ("all", "train", "validation", "test")
Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class Predictions:
    examples: tuple[Example, ...]
    probabilities: np.ndarray  # (N,)
    peak_box_distance: tuple[float | None, ...]  # model-input pixels to the nearest box (0:
    # inside one); None where there is no box to check against
    milliseconds_per_image: float
    ood_scores: np.ndarray | None = None  # (N,) where the model has a scope guard

    @property
    def peak_inside_box(self) -> tuple[bool | None, ...]:
        return tuple(None if d is None else d == 0 for d in self.peak_box_distance)

    @property
    def labels(self) -> np.ndarray:
        return np.array([e.label for e in self.examples], dtype=np.int8)


def predict(
    model: ModelSession,
    examples: Sequence[Example],
    batch: int = 16,
    progress: Progress | None = None,
    *,
    flip: bool = False,
) -> Predictions:
    """Run the model on every example. With *flip* (test-time augmentation), each image is run
    as it is and mirrored left-right, and the two probabilities are averaged (the CAM and the
    scope-guard score are the unflipped image's)."""
    spec = model.manifest.input
    probabilities: list[float] = []
    distances: list[float | None] = []
    guard: list[float] = []
    started = time.perf_counter()
    for start in range(0, len(examples), batch):
        chunk = examples[start : start + batch]
        inputs, geometries = [], []
        for example in chunk:
            tensor, geometry = model_input(read_display(example.path, spec.windowing), spec)
            inputs.append(tensor)
            geometries.append(geometry)
        stacked = np.stack(inputs)
        outputs = model.outputs(stacked)
        if flip:
            mirrored = model.outputs(np.ascontiguousarray(stacked[..., ::-1]))
            outputs = replace(
                outputs, probabilities=(outputs.probabilities + mirrored.probabilities) / 2
            )
        if outputs.ood_scores is not None:
            guard.extend(float(v) for v in outputs.ood_scores)
        for example, probability, cam, geometry in zip(
            chunk, outputs.probabilities, outputs.cams, geometries, strict=True
        ):
            probabilities.append(float(probability))
            if example.label == 1 and example.boxes:
                peak = cam_peak(cam, geometry, spec.size)
                distances.append(
                    min(_distance(b, peak.row, peak.column, geometry) for b in example.boxes)
                )
            else:
                distances.append(None)
        if progress is not None:
            progress(min(start + batch, len(examples)), len(examples))
    elapsed = (time.perf_counter() - started) * 1000
    return Predictions(
        tuple(examples),
        np.asarray(probabilities),
        tuple(distances),
        elapsed / max(1, len(examples)),
        np.asarray(guard) if guard else None,
    )


def _distance(box: Box, row: float, column: float, geometry: Geometry) -> float:
    """From a point to a box (0 inside), in model-input pixels (source pixels times the scale)."""
    dy = max(box.y0 - row, 0.0, row - box.y1) * geometry.scale_y
    dx = max(box.x0 - column, 0.0, column - box.x1) * geometry.scale_x
    return float(np.hypot(dx, dy))


def _rates(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    c = confusion(labels, scores, threshold)
    sensitivity = wilson_interval(c.true_positive, c.true_positive + c.false_negative)
    specificity = wilson_interval(c.true_negative, c.true_negative + c.false_positive)
    return {
        "threshold": round(c.threshold, 6),
        "sensitivity": round(c.sensitivity, 4),
        "sensitivity_ci95": [round(bound, 4) for bound in sensitivity],
        "specificity": round(c.specificity, 4),
        "specificity_ci95": [round(bound, 4) for bound in specificity],
        "tp": c.true_positive,
        "fn": c.false_negative,
        "tn": c.true_negative,
        "fp": c.false_positive,
    }


def summarise(predictions: Predictions, thresholds: dict[str, float]) -> dict[str, Any]:
    """The metrics document (JSON-ready) for *predictions*."""
    y, s = predictions.labels, predictions.probabilities
    area = auroc(y, s)
    checked = [v for v in predictions.peak_inside_box if v is not None]
    near = [d <= NEAR_BOX_PIXELS for d in predictions.peak_box_distance if d is not None]
    points = {name: _rates(y, s, t) for name, t in thresholds.items()}
    points["youden"] = _rates(y, s, youden_threshold(y, s))
    chance = ece_if_calibrated(s)
    return {
        "images": len(y),
        "fractured": int(y.sum()),
        "auroc": round(area.value, 4),
        "auroc_ci95": [round(area.low, 4), round(area.high, 4)],
        "operating_points": points,
        "cam_localisation": {
            "images_with_boxes": len(checked),
            "peak_inside_box": round(sum(checked) / len(checked), 4) if checked else None,
            f"peak_within_{NEAR_BOX_PIXELS}px": round(sum(near) / len(near), 4) if near else None,
        },
        "expected_calibration_error": round(expected_calibration_error(y, s), 4),
        "ece_if_calibrated": {"mean": round(chance[0], 4), "p95": round(chance[1], 4)},
        "calibration": [
            {
                "low": lo,
                "high": hi,
                "images": n,
                "mean_probability": round(p, 4),
                "fraction_fractured": round(f, 4),
            }
            for lo, hi, n, p, f in calibration_table(y, s)
        ],
        "ms_per_image": round(predictions.milliseconds_per_image, 2),
    }


def guard_summary(predictions: Predictions, threshold: float | None) -> dict[str, Any] | None:
    """How many of these (in-scope) images the model's scope guard lets through."""
    if predictions.ood_scores is None or threshold is None:
        return None
    passed = int((predictions.ood_scores <= threshold).sum())
    return {
        "threshold": round(threshold, 4),
        "passed": passed,
        "images": len(predictions.ood_scores),
        "pass_rate": round(passed / max(1, len(predictions.ood_scores)), 4),
    }


def operating_thresholds(predictions: Predictions, target: float = 0.9) -> dict[str, float]:
    """Thresholds reaching *target* sensitivity and *target* specificity on these predictions."""
    y, s = predictions.labels, predictions.probabilities
    return {
        "high_sensitivity": threshold_for_sensitivity(y, s, target),
        "high_specificity": threshold_for_specificity(y, s, target),
    }


def select(examples: list[Example], split: str, recipe: dict[str, Any]) -> list[Example]:
    """One split of a folder, made as training made it (block size, seed, fractions)."""
    if split == "all":
        return examples
    try:
        fractions = tuple(float(f) for f in recipe["fractions"])
        parts = block_split(
            examples,
            (fractions[0], fractions[1], fractions[2]),
            block_size=int(recipe["block_size"]),
            seed=int(recipe["seed"]),
        )
    except (KeyError, TypeError, ValueError, IndexError):
        raise DatasetFolderError(
            f"the model's manifest has no usable training_data.split to make the {split!r} split "
            "from; use --split all"
        ) from None
    return parts[split]


def evaluate(
    model_dir: Path,
    data_dir: Path,
    out_dir: Path,
    *,
    split: str = "all",
    intra_op_threads: int = 0,
    progress: Progress | None = None,
    flip: bool = False,
) -> dict[str, Any]:
    """Evaluate, write ``evaluation.json`` and ``roc.png`` into *out_dir*, return the document."""
    model = ModelSession(model_dir, intra_op_threads=intra_op_threads)
    manifest = model.manifest
    examples = select(load_folder(data_dir), split, manifest.training_data.get("split", {}))
    if len({e.label for e in examples}) < 2:
        raise DatasetFolderError(f"{data_dir} ({split}): needs both fractured and normal images")
    predictions = predict(model, examples, progress=progress, flip=flip)
    thresholds = {str(n): p.threshold for n, p in manifest.operating_points.items()}
    trained_on = manifest.training_data.get("trained_on") or ["train"]
    # --split all on another folder (a site's own labelled set) is unseen; on the training
    # folder (recorded by name) it holds the splits the model learnt from
    training_folder = Path(data_dir).resolve().name == manifest.training_data.get("directory")
    document = {
        "model": {"name": manifest.name, "version": manifest.version, "provider": model.provider},
        "data": {"directory": str(data_dir), "split": split},
        "warning": (
            f"the model was trained on the {' and '.join(map(str, trained_on))} split of its "
            "folder: on those images these figures flatter it"
            if split in trained_on or (split == "all" and training_folder)
            else None
        ),
        "test_time_augmentation": "horizontal flip, probabilities averaged" if flip else None,
        **summarise(predictions, thresholds),
        "scope_guard": guard_summary(predictions, manifest.ood_threshold),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "evaluation.json").write_text(json.dumps(document, indent=2) + "\n")
    title = f"{manifest.name} {manifest.version} on {data_dir.name} ({split})"
    roc_png(
        roc_points(predictions.labels, predictions.probabilities),
        out_dir / "roc.png",
        title=title,
        auc=document["auroc"],
        marks={
            n: (1 - p["specificity"], p["sensitivity"])
            for n, p in document["operating_points"].items()
        },
    )
    reliability_png(
        document["calibration"],
        out_dir / "reliability.png",
        title=title,
        ece=document["expected_calibration_error"],
    )
    return document


def _with_interval(point: dict[str, Any], rate: str) -> str:
    """ "0.865 (0.785-0.918)"; the bare rate for a document written without intervals."""
    interval = point.get(f"{rate}_ci95")
    if not interval:
        return f"{point[rate]:.3f}"
    return f"{point[rate]:.3f} ({interval[0]:.3f}-{interval[1]:.3f})"


def format_evaluation(document: dict[str, Any]) -> str:
    low, high = document["auroc_ci95"]
    lines = [
        f"model {document['model']['name']} {document['model']['version']} on "
        f"{document['data']['directory']} ({document['data']['split']}): "
        f"{document['images']} images, {document['fractured']} fractured",
        *([f"WARNING {document['warning']}"] if document.get("warning") else []),
        f"AUROC {document['auroc']:.3f} (95% CI {low:.3f}-{high:.3f})",
        "",
        f"{'operating point':<18}{'threshold':>10}{'sensitivity (95% CI)':>23}"
        f"{'specificity (95% CI)':>23}{'TP':>6}{'FN':>6}{'TN':>6}{'FP':>6}",
    ]
    for name, p in document["operating_points"].items():
        lines.append(
            f"{name:<18}{p['threshold']:>10.4f}{_with_interval(p, 'sensitivity'):>23}"
            f"{_with_interval(p, 'specificity'):>23}"
            f"{p['tp']:>6}{p['fn']:>6}{p['tn']:>6}{p['fp']:>6}"
        )
    loc = document["cam_localisation"]
    share = "-" if loc["peak_inside_box"] is None else f"{loc['peak_inside_box']:.3f}"
    near_key = f"peak_within_{NEAR_BOX_PIXELS}px"
    near = "-" if loc.get(near_key) is None else f"{loc[near_key]:.3f}"
    lines += ["", f"CAM peak inside a fracture box: {share} of {loc['images_with_boxes']} images"]
    lines += [f"CAM peak within {NEAR_BOX_PIXELS} input pixels of a box: {near}"]
    guard = document.get("scope_guard")
    if guard:
        lines += [
            f"scope guard (threshold {guard['threshold']}): passes {guard['passed']} of "
            f"{guard['images']} images ({guard['pass_rate']:.1%})"
        ]
    lines += [
        "",
        f"expected calibration error (10 bins): {document['expected_calibration_error']:.4f}",
    ]
    chance = document.get("ece_if_calibrated")
    if chance:  # documents written before it have none
        lines += [
            f"  from sampling alone (exactly calibrated probabilities, these images): mean "
            f"{chance['mean']:.4f}, 95th percentile {chance['p95']:.4f}"
        ]
    lines += ["calibration: probability bin, images, mean probability, fraction fractured"]
    for row in document["calibration"]:
        lines.append(
            f"  {row['low']:.1f}-{row['high']:.1f}{row['images']:>7}"
            f"{row['mean_probability']:>10.3f}{row['fraction_fractured']:>10.3f}"
        )
    return "\n".join(lines)
