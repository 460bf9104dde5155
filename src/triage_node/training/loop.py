"""``triage-node train``: a fracture model from a labelled image folder (training only; torch).

The recipe: images read as the runtime reads them and resized by the runtime's own
:func:`triage_node.analysis.preprocess.resize`; a split by shuffled blocks of consecutive image
ids (no patient ids exist); batched augmentation (:mod:`triage_node.training.augment`); class
imbalance handled by weighting the positive class; AdamW with warm-up and cosine decay; an
exponential moving average of the weights; early stopping on validation AUROC; optional k-fold
cross-validation on the training part. The network is either trained from scratch
(:class:`triage_node.training.network.FractureNet`) or fine-tuned from ImageNet weights
(:mod:`triage_node.training.backbone`) in two stages: the backbone frozen for ``freeze_epochs``
(only the last 1x1 convolutions and the CAM head learn), then unfrozen above ``frozen_blocks``
with discriminative learning rates (lower blocks slower). Every epoch ends with a checkpoint
(``train-state.pt``) that ``--resume`` continues from, so a long run can span sessions.
:mod:`triage_node.training.finalise` then calibrates, fits the scope guard, exports and
describes the best network.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
import sys
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from triage_node.errors import ModelError
from triage_node.training.augment import augment, localisation_loss
from triage_node.training.backbone import PretrainedNet, pool_logits
from triage_node.training.folders import Example, block_folds
from triage_node.training.images import (
    CamNet,
    Images,
    build_net,
    memory_format,
    normalise,
    score_images,
)
from triage_node.training.precision import native_bf16, step_precision
from triage_node.training.settings import (
    TrainConfig,
    cross_validation_settings,
    fingerprint,
    same_run,
)
from triage_node.training.statistics import auroc

Report = Callable[[str], None]
STATE_FILE = "train-state.pt"


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


def make_optimiser(net: CamNet, config: TrainConfig) -> torch.optim.Optimizer:
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


def train_step(
    net: CamNet,
    train: Images,
    index: torch.Tensor,
    config: TrainConfig,
    frozen: int,
    generator: torch.Generator,
    pos_weight: torch.Tensor,
    optimiser: torch.optim.Optimizer,
) -> float:
    """One optimiser step on the images *index* (augmented with *generator*); returns the loss.
    The forward pass runs in ``config.precision``, the loss in float32."""
    device = pos_weight.device
    pixels, masks, labels = (t.to(device) for t in train.batch(index))
    targets = train.box_masks(index).to(device) if config.box_loss > 0 else None
    warped = augment(pixels, masks, config.augment, generator, targets=targets)
    with step_precision(device, config.precision):
        cam = net.cam(normalise(warped[:, :1], config), frozen)
    cam = cam.float()  # the loss in float32 whatever the step's arithmetic
    loss = F.binary_cross_entropy_with_logits(
        pool_logits(cam, config.pooling), labels, pos_weight=pos_weight
    )
    if targets is not None:
        loss = loss + config.box_loss * localisation_loss(cam, warped[:, 1:])
    optimiser.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    optimiser.step()
    return float(loss.item())


def _save_state(path: Path, state: dict[str, Any]) -> None:
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    temporary.replace(path)


def fit(
    train: Images,
    validation: Images | None,
    config: TrainConfig,
    report: Report,
    log_path: Path | None,
    state_path: Path | None = None,
) -> tuple[CamNet, dict[str, Any]]:
    """Train one network; returns the best one (by validation AUROC) and its epoch record.
    Without *validation* (``--refit``: nothing is held out) it trains exactly ``epochs`` and
    returns the last.

    With *state_path*, each epoch ends by saving everything needed to go on (weights, moving
    average, optimiser, schedule, random generators, best so far); if the file exists already it
    is continued from (``--resume``).
    """
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)  # on the CPU whatever the device
    device = torch.device(config.device)
    net = build_net(config)
    if config.init_weights is not None:
        _load_init_weights(net, config.init_weights, report)
    net = net.to(device, memory_format=memory_format(config))  # type: ignore[call-overload]
    ema = None
    if config.ema_decay > 0:
        average = get_ema_multi_avg_fn(config.ema_decay)  # type: ignore[no-untyped-call]
        ema = AveragedModel(net, multi_avg_fn=average, use_buffers=True)
    optimiser = make_optimiser(net, config)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total, warmup = config.epochs * steps_per_epoch, config.warmup_epochs * steps_per_epoch

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, rate)
    positives = float(train.labels.sum())
    pos_weight = torch.tensor((len(train) - positives) / max(positives, 1.0), device=device)
    best: dict[str, Any] = {"auroc": -1.0, "epoch": 0}
    best_state: dict[str, torch.Tensor] = {}
    history: list[float] = []  # validation AUROC of each epoch
    first = 1
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if not same_run(state["fingerprint"], config):
            raise ModelError(
                f"{state_path} was written by a run with other settings; remove it, or resume "
                "with the settings it was started with"
            )
        best, best_state, first = state["best"], state["best_state"], state["epoch"] + 1
        history = list(state.get("history", []))
        report(f"resuming after epoch {first - 1} (best {best['auroc']:.4f} at {best['epoch']})")
        if state.get("finished") or (
            first - 1 >= config.min_epochs and first - 1 - best["epoch"] >= config.patience
        ):
            first = config.epochs + 1  # it had finished or stopped early: nothing left to train
        else:
            net.load_state_dict(state["net"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
            optimiser.load_state_dict(state["optimiser"])
            schedule.load_state_dict(state["schedule"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            if device.type == "cuda" and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(state["cuda_rng"], device)
    if config.precision == "bf16" and first <= config.epochs and not native_bf16(device):
        report(
            f"warning: {device.type} has no native bfloat16 (AVX512-BF16, AMX or a recent GPU); "
            "--precision bf16 will train more slowly than fp32 here"
        )
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
            loss = train_step(net, train, index, config, frozen, generator, pos_weight, optimiser)
            schedule.step()
            if ema is not None:
                ema.update_parameters(net)
            losses.append(loss)
            _progress(epoch, config.epochs, step + 1, steps_per_epoch, float(np.mean(losses)))
        judged = cast(CamNet, ema.module if ema is not None else net)
        record: dict[str, Any] = {
            "epoch": epoch,
            "frozen_blocks": frozen,
            "train_loss": round(float(np.mean(losses)), 5),
            "learning_rate": round(float(schedule.get_last_lr()[-1]), 7),
        }
        if validation is None:  # nothing held out: the last epoch is the one kept
            best = {"auroc": float("nan"), "epoch": epoch}
            best_state = copy.deepcopy(judged.state_dict())
            record.update(best_epoch=epoch, seconds=round(time.perf_counter() - started, 1))
            report(
                f"epoch {epoch:3d}  loss {record['train_loss']:.4f}  (no validation: "
                f"train + validation)  {record['seconds']:.0f} s"
            )
        else:
            scored = score_images(judged, validation, config)
            value = auroc(validation.labels.numpy(), scored.logits).value
            record.update(
                validation_auroc=round(value, 4),
                validation_cam_peak_in_box=_rounded(scored.peak_in_box),
                validation_cam_peak_within_16px=_rounded(scored.peak_near_box),
                seconds=round(time.perf_counter() - started, 1),
            )
            history.append(round(value, 4))
            if value > best["auroc"] or config.select == "last":
                best = {"auroc": value, "epoch": epoch}
                best_state = copy.deepcopy(judged.state_dict())
            record["best_epoch"] = best["epoch"]
            in_box, near = scored.peak_in_box, scored.peak_near_box
            report(
                f"epoch {epoch:3d}  loss {record['train_loss']:.4f}  validation AUROC {value:.4f}  "
                + ("" if in_box is None else f"CAM peak in box {in_box:.3f}  ")
                + ("" if near is None else f"within 16 px {near:.3f}  ")
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
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "best": best,
                    "best_state": best_state,
                    "history": history,
                },
            )
        if epoch >= config.min_epochs and epoch - best["epoch"] >= config.patience:
            report(f"early stop: no better validation AUROC for {config.patience} epochs")
            break
    final = build_net(config, pretrained=False)  # on the CPU, where export and finalising run
    final.load_state_dict(best_state)
    return final.eval(), {**best, "validation_auroc_by_epoch": history}


def compact_state(path: Path) -> None:
    """Shrink a finished run's ``train-state.pt`` to what finalising needs (its best network and
    record): a fifth of the size, so a run trained on one machine (a GPU) can be finalised on
    another with ``--resume``. A compacted state cannot be trained further."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    kept = {
        "fingerprint": state["fingerprint"],
        "epoch": state["epoch"],
        "best": state["best"],
        "best_state": state["best_state"],
        "finished": True,
    }
    _save_state(path, kept)


def _mean_curve(curves: list[list[float] | None]) -> dict[str, Any]:
    """The folds' mean held-out AUROC at each epoch all of them reached, and the epoch where it
    is highest: the epoch count cross-validation chooses (``--epochs N --select last``)."""
    if not curves or any(not c for c in curves):
        return {}
    complete = cast(list[list[float]], curves)
    reached = min(len(c) for c in complete)
    mean = [round(float(np.mean([c[e] for c in complete])), 4) for e in range(reached)]
    return {"auroc_by_epoch_mean": mean, "best_mean_epoch": int(np.argmax(mean)) + 1}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def cross_validate(
    examples: Sequence[Example],
    images: Images,
    config: TrainConfig,
    report: Report,
    directory: Path | None = None,
    only: Collection[int] | None = None,
) -> dict[str, Any]:
    """k-fold cross-validation (by blocks) of the recipe; returns each fold's best AUROC and
    CAM localisation at that epoch, with their mean and spread over the folds done.

    With *only*, just those folds are trained (the others are taken from the record if done
    before, else left out): several sessions or machines can share out the folds.

    With *directory*, each finished fold is recorded in ``cross-validation.json`` (its best
    network and held-out logits in ``cv-fold-K-best.pt``) and a fold in progress checkpoints to
    ``cv-fold-K.pt``, so ``--resume`` goes on where it stopped.
    """
    config = cross_validation_settings(config)  # --refit changes only the final network
    position = {e.image_id: i for i, e in enumerate(examples)}
    record_path = directory / "cross-validation.json" if directory else None
    done: dict[str, Any] = {}
    if record_path is not None and record_path.is_file():
        done = json.loads(record_path.read_text(encoding="utf-8"))
        if not same_run(done.get("fingerprint", {}), config):
            raise ModelError(
                f"{record_path} was written by a cross-validation with other settings; move "
                "it aside, or run with the settings it was made with"
            )
    folds: dict[str, Any] = done.get("folds", {})
    for fold, (train, held) in enumerate(
        block_folds(examples, config.folds, block_size=config.block_size, seed=config.seed), 1
    ):
        if str(fold) in folds:
            summary = {k: v for k, v in folds[str(fold)].items() if k != "held_logits"}
            report(f"cross-validation fold {fold}/{config.folds}: done before ({summary})")
            continue
        if only is not None and fold not in only:
            continue
        report(f"cross-validation fold {fold}/{config.folds}: {len(train)} train, {len(held)} held")

        def subset(part: list[Example]) -> Images:
            index = torch.tensor([position[e.image_id] for e in part])
            return images.take(index)

        state = directory / f"cv-fold-{fold}.pt" if directory else None
        held_images = subset(held)
        net, best = fit(subset(train), held_images, config, report, None, state)
        scored = score_images(net, held_images, config)
        held_logits = {e.image_id: float(v) for e, v in zip(held, scored.logits, strict=True)}
        if directory is not None:  # the fold's network and its held-out logits, for ensembles
            torch.save(
                {
                    "fingerprint": fingerprint(config),
                    "net": net.state_dict(),
                    "held_logits": held_logits,
                },
                directory / f"cv-fold-{fold}-best.pt",
            )
        folds[str(fold)] = {
            "auroc": round(best["auroc"], 4),
            "best_epoch": best["epoch"],
            "cam_peak_within_16px": _rounded(scored.peak_near_box),
            "auroc_by_epoch": best["validation_auroc_by_epoch"],
            # out-of-fold logits in the record itself (a few kB), so that they outlive the
            # fold networks' files (a fold ensemble's calibration, an analysis of the folds)
            "held_logits": {k: round(v, 5) for k, v in held_logits.items()},
        }
        if record_path is not None:
            document = {"fingerprint": fingerprint(config), "folds": folds}
            record_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        if state is not None:
            state.unlink(missing_ok=True)
    done_folds = [k for k in range(1, config.folds + 1) if str(k) in folds]
    values = [folds[str(k)]["auroc"] for k in done_folds]
    near = [folds[str(k)]["cam_peak_within_16px"] for k in done_folds]
    return {
        "folds": config.folds,
        **({} if len(done_folds) == config.folds else {"folds_done": done_folds}),
        **_mean_curve([folds[str(k)].get("auroc_by_epoch") for k in done_folds]),
        "auroc": values,
        "auroc_mean": round(float(np.mean(values)), 4) if values else None,
        "auroc_sd": round(float(np.std(values, ddof=1)), 4) if len(values) > 1 else None,
        **(
            {
                "cam_peak_within_16px": near,
                "cam_peak_within_16px_mean": round(float(np.mean(near)), 4),
            }
            if near and all(v is not None for v in near)
            else {}
        ),
    }
