"""The settings of one ``triage-node train`` run, and which of them a ``--resume`` may change
(training only; no torch here)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from triage_node.analysis.preprocess import InputSpec
from triage_node.training.augment import AugmentSpec
from triage_node.training.backbone import BackboneSpec, Pooling
from triage_node.training.network import NetSpec

SCOPES = ("auto", "fracatlas", "any")
SELECTIONS = ("best", "last")
PRECISIONS = ("fp32", "bf16")


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
    device: str = "cpu"  # where the network trains: cpu, cuda or cuda:N (export is on the CPU)
    precision: str = "fp32"  # the training steps' arithmetic: fp32, or bf16 (autocast)
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
    select: str = "best"  # the epoch kept: best (validation AUROC) or last (a fixed count)
    refit: bool = False  # after cross-validation, train the kept network on train + validation
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
        if self.select not in SELECTIONS:
            raise ValueError(f"--select must be one of {', '.join(SELECTIONS)}")
        if self.freeze_epochs < 0 or self.frozen_blocks < 0:
            raise ValueError("--freeze-epochs and --frozen-blocks must not be negative")
        if self.epochs < 1 or self.batch_size < 2 or self.patience < 1:
            raise ValueError("--epochs and --patience must be positive, --batch-size at least 2")
        if self.folds == 1 or self.folds < 0:
            raise ValueError("--folds must be 0 (none) or at least 2")
        if self.refit and not self.folds:
            raise ValueError(
                "--refit needs --folds: the folds' held-out logits calibrate the network and "
                "choose its thresholds, as the validation split it trains on no longer can"
            )
        if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", self.device):
            raise ValueError("--device must be cpu, cuda or cuda:N")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}")


# Settings a resumed run may change: finalise-only, cosmetic, or not the main run's.
RESUMABLE_CHANGES = frozenset(
    {
        "epochs",
        "threads",
        "device",
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
    """What must not change between a run and its --resume (the data folder as an absolute
    path: ``../shared/data/x`` and ``/work/shared/data/x`` are the same run)."""
    keep = {k: v for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES}
    keep["data"] = Path(config.data).resolve()
    document: dict[str, Any] = json.loads(json.dumps(keep, default=str))
    return document


def same_run(stored: dict[str, Any], config: TrainConfig) -> bool:
    """Whether a checkpoint's fingerprint is this configuration's (keys that may change are
    left out on both sides, so a checkpoint from before a key became changeable still fits; a
    data folder recorded as a relative path is taken from the working directory)."""
    kept = {k: v for k, v in stored.items() if k not in RESUMABLE_CHANGES}
    if "data" in kept:
        kept["data"] = str(Path(kept["data"]).resolve())
    wanted = fingerprint(config)
    # a setting added since the checkpoint was written matches when this run leaves it at its
    # default (the run it was written by had no other choice)
    defaults = fingerprint(TrainConfig(data=config.data, out=config.out))
    for key in wanted.keys() - kept.keys():
        if wanted[key] == defaults[key]:
            kept[key] = wanted[key]
    return kept == wanted


def cross_validation_settings(config: TrainConfig) -> TrainConfig:
    """The settings that make a cross-validation: *config* less what only the final network
    uses (``--refit`` trains it on the folds' whole pool; the folds are the same)."""
    return replace(config, refit=False)


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
