"""``triage-node train``: a fracture model from a labelled image folder (training only; torch).

The recipe: images read as the runtime reads them and resized by the runtime's own
:func:`triage_node.preprocess.resize`; a split by shuffled blocks of consecutive image ids (no
patient ids exist); batched augmentation (:mod:`triage_node.augment`); class imbalance handled by
weighting the positive class; AdamW with warm-up and cosine decay; an exponential moving average
of the weights; early stopping on validation AUROC; optional k-fold cross-validation on the
training part. The best network is exported to ONNX (parity-checked), and the operating-point
thresholds and the validation (and test) metrics are measured through ONNX Runtime and written
into ``manifest.json``.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from triage_node import __version__
from triage_node.augment import AugmentSpec, augment, localisation_loss
from triage_node.dataset import Example, block_folds, block_split, load_folder
from triage_node.errors import DatasetFolderError, ModelError
from triage_node.evaluate import operating_thresholds, predict, summarise
from triage_node.imagefile import read_display
from triage_node.infer import Model
from triage_node.metrics import auroc
from triage_node.net import FractureNet, NetSpec
from triage_node.onnxexport import export_checked, input_section, write_manifest
from triage_node.preprocess import InputSpec, resize

Report = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class TrainConfig:
    data: Path
    out: Path
    name: str = ""  # default: the output directory's name
    version: str = "1.0.0"
    size: int = 320
    epochs: int = 50
    patience: int = 15  # epochs without a better validation AUROC before stopping ...
    min_epochs: int = 20  # ... but never before this many: from scratch, learning starts slowly
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 2
    ema_decay: float = 0.99  # per step; 0 disables the moving average
    seed: int = 0
    block_size: int = 20
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    folds: int = 0  # >= 2: k-fold cross-validation on train + validation first
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    net: NetSpec = field(default_factory=NetSpec)
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    init_weights: Path | None = None
    box_loss: float = 0.5  # weight of the CAM localisation loss on images with boxes; 0 = off
    mean: float = 0.5
    std: float = 0.25
    dataset_info: dict[str, Any] = field(default_factory=dict)  # provenance for the manifest

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(
            size=self.size, channels=self.net.in_channels, mean=self.mean, std=self.std
        )

    def check(self) -> None:
        if self.size < 32 or self.size % self.net.stride:
            raise ValueError(f"--size must be a multiple of {self.net.stride} and at least 32")
        if self.epochs < 1 or self.batch_size < 2 or self.patience < 1:
            raise ValueError("--epochs and --patience must be positive, --batch-size at least 2")
        if self.folds == 1 or self.folds < 0:
            raise ValueError("--folds must be 0 (none) or at least 2")


@dataclass(slots=True)
class Images:
    """Model-sized [0, 1] images kept in memory (float16) with their letterbox boxes."""

    pixels: torch.Tensor  # (N, 1, S, S) float16
    areas: torch.Tensor  # (N, 4) int: top, left, height, width of the image inside the padding
    labels: torch.Tensor  # (N,) float32
    boxes: torch.Tensor  # (N, 1, S, S) bool: fracture boxes in model coordinates

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: torch.Tensor | slice) -> Images:
        return Images(self.pixels[index], self.areas[index], self.labels[index], self.boxes[index])

    def box_masks(self, index: torch.Tensor) -> torch.Tensor:
        return self.boxes[index].float()

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pixels = self.pixels[index].float()
        size = pixels.shape[-1]
        grid = torch.arange(size)
        top, left, height, width = (self.areas[index, i].view(-1, 1) for i in range(4))
        rows = (grid >= top) & (grid < top + height)
        columns = (grid >= left) & (grid < left + width)
        masks = (rows[:, :, None] & columns[:, None, :]).unsqueeze(1).float()
        return pixels, masks, self.labels[index]


def load_images(examples: Sequence[Example], size: int, report: Report) -> Images:
    pixels = torch.zeros(len(examples), 1, size, size, dtype=torch.float16)
    areas = torch.zeros(len(examples), 4, dtype=torch.int64)
    boxes = torch.zeros(len(examples), 1, size, size, dtype=torch.bool)
    started = time.perf_counter()
    for i, example in enumerate(examples):
        resized, g = resize(read_display(example.path), size, "letterbox")
        pixels[i, 0] = torch.from_numpy(resized)
        areas[i] = torch.tensor(
            [g.pad_top, g.pad_left, round(g.rows * g.scale_y), round(g.columns * g.scale_x)]
        )
        for box in example.boxes:  # source pixels -> model input pixels, as resize placed them
            top = max(0, int(g.pad_top + box.y0 * g.scale_y))
            left = max(0, int(g.pad_left + box.x0 * g.scale_x))
            bottom = min(size, math.ceil(g.pad_top + box.y1 * g.scale_y))
            right = min(size, math.ceil(g.pad_left + box.x1 * g.scale_x))
            boxes[i, 0, top:bottom, left:right] = True
        if (i + 1) % 500 == 0 or i + 1 == len(examples):
            report(f"read {i + 1}/{len(examples)} images ({time.perf_counter() - started:.0f} s)")
    labels = torch.tensor([e.label for e in examples], dtype=torch.float32)
    return Images(pixels, areas, labels, boxes)


def _memory_format(spec: NetSpec) -> torch.memory_format:
    """channels_last trains about a quarter faster on CPU; torch 2.13's oneDNN path corrupts
    memory in the backward pass of layers with fewer than 16 channels, so narrow nets stay NCHW."""
    narrowest = min(spec.stem, *spec.widths)
    return torch.channels_last if narrowest >= 16 else torch.contiguous_format


def _normalise(x: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """The runtime's normalise(): (x - mean) / std, repeated over the input channels."""
    x = (x - config.mean) / config.std
    if config.net.in_channels > 1:
        x = x.repeat(1, config.net.in_channels, 1, 1)
    return x.contiguous(memory_format=_memory_format(config.net))


def _scores(
    net: FractureNet, images: Images, config: TrainConfig
) -> tuple[np.ndarray, float | None]:
    """Validation probabilities, and the share of boxed images whose CAM peak cell centre lies
    in a box (model coordinates; None when no image has a box)."""
    net.eval()
    out, hits, boxed = [], 0, 0
    with torch.no_grad():
        for start in range(0, len(images), 64):
            index = torch.arange(start, min(start + 64, len(images)))
            pixels, _, _ = images.batch(index)
            cam = net.cam(_normalise(pixels, config))
            out.append(torch.sigmoid(cam.mean(dim=(1, 2, 3))))
            boxes = images.boxes[index, 0]
            has_box = boxes.flatten(1).any(dim=1)
            if bool(has_box.any()):
                cells = cam.shape[-1]
                stride = pixels.shape[-1] // cells
                peak = cam[has_box].flatten(1).argmax(dim=1)
                rows = (peak // cells) * stride + stride // 2
                columns = (peak % cells) * stride + stride // 2
                inside = boxes[has_box][torch.arange(len(peak)), rows, columns]
                hits += int(inside.sum())
                boxed += len(peak)
    return torch.cat(out).numpy(), (hits / boxed if boxed else None)


def _progress(epoch: int, epochs: int, done: int, total: int, loss: float) -> None:
    if sys.stderr.isatty():
        bar = "#" * (30 * done // total)
        sys.stderr.write(f"\repoch {epoch}/{epochs} [{bar:<30}] {done}/{total} loss {loss:.4f}")
        if done == total:
            sys.stderr.write("\r" + " " * 79 + "\r")
        sys.stderr.flush()


def _load_init_weights(net: FractureNet, path: Path, report: Report) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
        raise ModelError(f"--init-weights {path}: cannot be read: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = net.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ModelError(f"--init-weights {path}: no tensor matches this network's layers")
    net.load_state_dict(usable, strict=False)
    report(f"initial weights: {len(usable)} of {len(own)} tensors from {path}")


def fit(
    train: Images, validation: Images, config: TrainConfig, report: Report, log_path: Path | None
) -> tuple[FractureNet, dict[str, Any]]:
    """Train one network; returns the best one (by validation AUROC) and its epoch record."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    net = FractureNet(config.net)
    if config.init_weights is not None:
        _load_init_weights(net, config.init_weights, report)
    net = net.to(memory_format=_memory_format(config.net))  # type: ignore[call-overload]
    ema = None
    if config.ema_decay > 0:
        average = get_ema_multi_avg_fn(config.ema_decay)  # type: ignore[no-untyped-call]
        ema = AveragedModel(net, multi_avg_fn=average, use_buffers=True)
    optimiser = torch.optim.AdamW(
        net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total, warmup = config.epochs * steps_per_epoch, config.warmup_epochs * steps_per_epoch

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, rate)
    positives = float(train.labels.sum())
    pos_weight = torch.tensor((len(train) - positives) / max(positives, 1.0))
    best: dict[str, Any] = {"auroc": -1.0, "epoch": 0}
    best_state: dict[str, torch.Tensor] = {}
    validation_labels = validation.labels.numpy()
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        net.train()
        order = torch.randperm(len(train), generator=generator)
        losses = []
        for step in range(steps_per_epoch):
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            if len(index) < 2:
                continue
            pixels, masks, labels = train.batch(index)
            if config.box_loss > 0:
                warped = augment(
                    pixels, masks, config.augment, generator, targets=train.box_masks(index)
                )
                cam = net.cam(_normalise(warped[:, :1], config))
                loss = F.binary_cross_entropy_with_logits(
                    cam.mean(dim=(1, 2, 3)), labels, pos_weight=pos_weight
                ) + config.box_loss * localisation_loss(cam, warped[:, 1:])
            else:
                x = _normalise(augment(pixels, masks, config.augment, generator), config)
                loss = F.binary_cross_entropy_with_logits(net(x), labels, pos_weight=pos_weight)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            schedule.step()
            if ema is not None:
                ema.update_parameters(net)
            losses.append(loss.item())
            _progress(epoch, config.epochs, step + 1, steps_per_epoch, float(np.mean(losses)))
        judged = ema.module if ema is not None else net
        scores, localisation = _scores(cast(FractureNet, judged), validation, config)
        value = auroc(validation_labels, scores).value
        record = {
            "epoch": epoch,
            "train_loss": round(float(np.mean(losses)), 5),
            "validation_auroc": round(value, 4),
            "validation_cam_peak_in_box": None if localisation is None else round(localisation, 4),
            "learning_rate": round(float(schedule.get_last_lr()[0]), 7),
            "seconds": round(time.perf_counter() - started, 1),
        }
        if value > best["auroc"]:
            best = {"auroc": value, "epoch": epoch}
            best_state = copy.deepcopy(judged.state_dict())
        record["best_epoch"] = best["epoch"]
        report(
            f"epoch {epoch:3d}  loss {record['train_loss']:.4f}  validation AUROC {value:.4f}  "
            + ("" if localisation is None else f"CAM peak in box {localisation:.3f}  ")
            + f"(best {best['auroc']:.4f} at {best['epoch']})  {record['seconds']:.0f} s"
        )
        if log_path is not None:
            with open(log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        if epoch >= config.min_epochs and epoch - best["epoch"] >= config.patience:
            report(f"early stop: no better validation AUROC for {config.patience} epochs")
            break
    final = FractureNet(config.net)
    final.load_state_dict(best_state)
    return final.eval(), best


def cross_validate(
    examples: Sequence[Example], images: Images, config: TrainConfig, report: Report
) -> dict[str, Any]:
    """k-fold cross-validation (by blocks) of the recipe; returns each fold's best AUROC."""
    position = {e.image_id: i for i, e in enumerate(examples)}
    values = []
    for fold, (train, held) in enumerate(
        block_folds(examples, config.folds, block_size=config.block_size, seed=config.seed), 1
    ):
        report(f"cross-validation fold {fold}/{config.folds}: {len(train)} train, {len(held)} held")

        def subset(part: list[Example]) -> Images:
            index = torch.tensor([position[e.image_id] for e in part])
            return images.take(index)

        _, best = fit(subset(train), subset(held), config, report, None)
        values.append(round(best["auroc"], 4))
    return {
        "folds": config.folds,
        "auroc": values,
        "auroc_mean": round(float(np.mean(values)), 4),
        "auroc_sd": round(float(np.std(values, ddof=1)), 4),
    }


def _manifest(
    config: TrainConfig,
    splits: dict[str, list[Example]],
    thresholds: dict[str, float],
    metrics: dict[str, Any],
    best: dict[str, Any],
) -> dict[str, Any]:
    def counts(part: list[Example]) -> dict[str, int]:
        return {"images": len(part), "fractured": sum(e.label for e in part)}

    validation = metrics.get("validation", {}).get("operating_points", {})
    return {
        "name": config.name or config.out.name,
        "version": config.version,
        "description": "Image-level fracture probability with a class-activation map.",
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
        "selection": {
            "modalities": ["CR", "DX", "DR"],
            "sop_classes": [],
            "body_parts": [],
            "views": [],
        },
        "network": {
            "architecture": "FractureNet (residual CNN, GAP + linear head = exact CAM)",
            **asdict(config.net),
        },
        "training_data": {
            **config.dataset_info,
            "directory": config.data.name,
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
                "best_epoch": best["epoch"],
                "batch_size": config.batch_size,
                "optimiser": "AdamW",
                "learning_rate": config.learning_rate,
                "weight_decay": config.weight_decay,
                "warmup_epochs": config.warmup_epochs,
                "schedule": "cosine",
                "ema_decay": config.ema_decay,
                "patience": config.patience,
                "min_epochs": config.min_epochs,
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


def train(config: TrainConfig, report: Report = print) -> dict[str, Any]:
    """Train, export and describe a model; returns the manifest document written."""
    config.check()
    if config.threads:
        torch.set_num_threads(config.threads)
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
    config.out.mkdir(parents=True, exist_ok=True)
    log_path = config.out / "train-log.jsonl"
    log_path.unlink(missing_ok=True)

    order = splits["train"] + splits["validation"]
    images = load_images(order, config.size, report)
    n_train = len(splits["train"])
    train_images = images.take(slice(0, n_train))
    validation_images = images.take(slice(n_train, None))
    metrics: dict[str, Any] = {}
    if config.folds:
        metrics["cross_validation"] = cross_validate(order, images, config, report)
        report(f"cross-validation: {metrics['cross_validation']}")
    net, best = fit(train_images, validation_images, config, report, log_path)
    torch.save(
        {"state_dict": net.state_dict(), "network": asdict(config.net)},
        config.out / "checkpoint.pt",
    )

    sample = (
        _normalise(validation_images.batch(torch.arange(min(4, len(validation_images))))[0], config)
        .contiguous()
        .numpy()
    )
    worst = export_checked(net, config.input_spec, config.out, sample)
    report(f"exported {config.out / 'model.onnx'}: parity torch vs ONNX Runtime {worst:.2e}")

    provisional = {"high_sensitivity": 0.5, "high_specificity": 0.5}
    write_manifest(config.out, _manifest(config, splits, provisional, metrics, best))
    model = Model(config.out, intra_op_threads=config.threads)
    validation = predict(model, splits["validation"])
    thresholds = operating_thresholds(validation)
    metrics["validation"] = summarise(validation, thresholds)
    if len({e.label for e in splits["test"]}) == 2:
        metrics["test"] = summarise(predict(model, splits["test"]), thresholds)
    metrics["export_parity_max_abs_diff"] = float(f"{worst:.3g}")
    document = _manifest(config, splits, thresholds, metrics, best)
    write_manifest(config.out, document)
    v = metrics["validation"]
    report(
        f"validation AUROC {v['auroc']:.4f} (95% CI {v['auroc_ci95'][0]:.4f}-"
        f"{v['auroc_ci95'][1]:.4f}); thresholds {thresholds}"
    )
    return document


def with_overrides(config: TrainConfig, **values: Any) -> TrainConfig:
    return replace(config, **{k: v for k, v in values.items() if v is not None})
