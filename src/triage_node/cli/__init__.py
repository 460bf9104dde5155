"""The ``triage-node`` command.

Exit codes: 0 success (or healthy), 1 unhealthy / failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from triage_node import __version__
from triage_node.cli.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from triage_node.cli.training_commands import (
    add_evaluate_parser,
    add_train_parser,
    run_evaluate,
    run_train,
)
from triage_node.cli.user_commands import add_users_parser, run_users
from triage_node.config import Config, load_config
from triage_node.errors import TriageError
from triage_node.logs import configure_logging


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

    add_users_parser(commands)

    commands.add_parser(
        "hash-secret",
        help="hash a DICOMweb token or password (read from stdin) for dicomweb.tokens/users",
    )

    infer = commands.add_parser(
        "infer", help="run the model on DICOM files, without the network (to check a model)"
    )
    infer.add_argument("paths", nargs="+", type=Path, metavar="FILE_OR_DIR")
    infer.add_argument("--model", type=Path, help="model directory (default: worker.model_dir)")
    infer.add_argument("--json", action="store_true", help="machine-readable output")

    add_train_parser(commands)
    add_evaluate_parser(commands)

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

    commands.add_parser(
        "build-dcmtk",
        help='build the DCMTK transport\'s program now (dicom.transport = "dcmtk"; '
        "needs g++ and libdcmtk-dev)",
    )

    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_commands.add_parser("upgrade", help="apply pending schema migrations")
    db_commands.add_parser("current", help="print the schema revision of the database")
    return parser


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


def _build_dcmtk(config: Config, _args: argparse.Namespace) -> int:
    from triage_node.dicom.native.build import ensure_program

    print(ensure_program(config.storage.data_dir))
    return EXIT_OK


def _hash_secret(_config: Config, _args: argparse.Namespace) -> int:
    from triage_node.credentials import hash_secret

    if sys.stdin.isatty():
        secret = getpass.getpass("token or password: ")
    else:
        secret = sys.stdin.readline().rstrip("\r\n")
    if not secret:
        print("triage-node hash-secret: no secret given", file=sys.stderr)
        return EXIT_USAGE
    print(hash_secret(secret))
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
        "train": run_train,
        "evaluate": run_evaluate,
        "status": _status,
        "outbox": _outbox,
        "worklist": _worklist,
        "priority": _priority,
        "mark-reported": _mark_reported,
        "db": _db,
        "hash-secret": _hash_secret,
        "build-dcmtk": _build_dcmtk,
        "users": run_users,
    }
    try:
        return handlers[args.command](config, args)
    except TriageError as exc:
        print(f"triage-node: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
