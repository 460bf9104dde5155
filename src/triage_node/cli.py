"""The ``triage-node`` command.

Exit codes: 0 success (or healthy), 1 unhealthy / failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from triage_node import __version__
from triage_node.config import Config, load_config
from triage_node.errors import TriageError
from triage_node.logs import configure_logging

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


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

    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_commands.add_parser("upgrade", help="apply pending schema migrations")
    db_commands.add_parser("current", help="print the schema revision of the database")
    return parser


def _serve(config: Config, _args: argparse.Namespace) -> int:
    from triage_node.service import serve

    return serve(config)


def _worker(config: Config, _args: argparse.Namespace) -> int:
    from triage_node.service import serve_workers

    return serve_workers(config)


def _infer(config: Config, args: argparse.Namespace) -> int:
    from triage_node.files import analyse_files, format_report

    report = analyse_files(args.paths, args.model or config.worker.model_dir, config.worker)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return EXIT_OK


def _status(config: Config, args: argparse.Namespace) -> int:
    from triage_node.health import collect_status, format_status

    report = collect_status(config, timeout=args.timeout)
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return EXIT_OK if report["healthy"] else EXIT_FAILED


def _db(config: Config, args: argparse.Namespace) -> int:
    from triage_node.db import current_revision, head_revision, make_engine, redact_url, upgrade

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
        "status": _status,
        "db": _db,
    }
    try:
        return handlers[args.command](config, args)
    except TriageError as exc:
        print(f"triage-node: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except SQLAlchemyError as exc:
        print(f"triage-node: database error: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
