"""``triage-node status``: is the node up, can it store, and what does it hold.

The report is a plain dict with a stable schema (``docs/status.schema.json``, explained in
docs/admin-guide.md); ``healthy`` is false, and the command exits 1, when any check in
``problems`` failed. New fields may be added within a schema version; none is removed or changes
meaning without bumping ``schema``.
"""

from __future__ import annotations

import shutil
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from triage_node import __version__
from triage_node.analysis.manifest import load_manifest
from triage_node.config import Config
from triage_node.db.database import Database
from triage_node.db.engine import (
    current_revision,
    head_revision,
    make_engine,
    redact_url,
    sqlite_path,
)
from triage_node.db.outbox import OutboxState
from triage_node.db.priority import PriorityRow, PriorityState
from triage_node.dicom.echo_scu import echo_destination, echo_listener
from triage_node.domain import Destination, WebDestination, parse_destination
from triage_node.errors import DatabaseError, ModelError

SCHEMA_VERSION = 2  # docs/status.schema.json; bumped only when a field changes meaning or goes
STATUS_WORKLIST_LIMIT = 50  # unreported positives listed by status (worklist lists all)
WORKER_STALE_SECONDS = 30.0  # six missed worker heartbeats


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _age(value: datetime | None, now: datetime) -> float | None:
    return None if value is None else round((now - value).total_seconds(), 1)


def _local_address(bind: str) -> str:
    """Where to reach a listener of this host bound to *bind* (a wildcard means loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(bind, bind)  # noqa: S104


def collect_status(config: Config, timeout: float = 5.0) -> dict[str, Any]:
    now = datetime.now(UTC)
    problems: list[str] = []
    dicom = config.dicom
    host = _local_address(dicom.bind)
    listener = {"ae_title": dicom.ae_title, "host": host, "port": dicom.port}
    listener.update(echo_listener(host, dicom.port, dicom.ae_title, timeout))
    if not listener["reachable"]:
        problems.append(f"listener {host}:{dicom.port} does not answer C-ECHO")
    if dicom.tls_port:
        listener["tls_port"] = dicom.tls_port
        listener["tls_listening"] = _accepts(host, dicom.tls_port, timeout)
        if not listener["tls_listening"]:
            problems.append(
                f"DICOM TLS listener {host}:{dicom.tls_port} does not accept connections"
            )

    report: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "version": __version__,
        "checked_at": now.isoformat(),
        "config": config.source,
        "listener": listener,
    }

    report["model"] = _check_model(config)
    if not report["model"]["ok"] and config.worker.count > 0:
        problems.append(f"model not usable: {report['model']['error']}")
    report["database"] = _check_database(report, config, now, problems)
    _add_spool(report, config, problems)
    report["problems"] = problems
    report["healthy"] = not problems
    return report


def _check_database(
    report: dict[str, Any], config: Config, now: datetime, problems: list[str]
) -> dict[str, Any]:
    database: dict[str, Any] = {"url": redact_url(config.database_url), "reachable": False}
    sqlite_file = sqlite_path(config.database_url)
    if sqlite_file is not None and not Path(sqlite_file).exists():
        # Looking must not create an empty database.
        database["error"] = "database file does not exist (has 'triage-node serve' run?)"
        problems.append("database file does not exist")
        return database
    engine = make_engine(config.database_url, busy_timeout=min(config.database.busy_timeout, 5))
    try:
        revision, head = current_revision(engine), head_revision()
        database.update(reachable=True, revision=revision, schema_current=revision == head)
        if revision != head:
            problems.append(f"database schema {revision or 'empty'} is not {head}: run db upgrade")
        if revision is not None:
            _add_contents(report, Database(engine), config, now, problems)
    except DatabaseError as exc:
        database["error"] = getattr(exc, "cause", "") or type(exc).__name__
        problems.append("database unreachable")
    finally:
        engine.dispose()
    return database


def _check_model(config: Config) -> dict[str, Any]:
    """The configured model directory: usable (manifest valid, SHA-256 matches) or why not."""
    directory = config.worker.model_dir
    try:
        manifest = load_manifest(directory)
    except ModelError as exc:
        return {"dir": str(directory), "ok": False, "error": str(exc), "providers": []}
    return {
        "dir": str(directory),
        "ok": True,
        "name": manifest.name,
        "version": manifest.version,
        "input_size": manifest.input.size,
        "thresholds": {k: p.threshold for k, p in manifest.operating_points.items()},
        "providers": [],  # the execution providers running workers use (filled from the database)
    }


def _add_spool(report: dict[str, Any], config: Config, problems: list[str]) -> None:
    spool_root = config.storage.spool_path
    probe = spool_root if spool_root.exists() else config.storage.data_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    minimum = config.storage.min_free_mb * 2**20
    report["spool"] = {
        "path": str(spool_root),
        "bytes": report.get("instances", {}).get("bytes", 0),
        "disk_free_bytes": free,
        "min_free_bytes": minimum,
        "ok": free >= minimum,
    }
    if free < minimum:
        problems.append("free disk below the configured minimum: new instances get status A700")


def _add_contents(
    report: dict[str, Any], store: Database, config: Config, now: datetime, problems: list[str]
) -> None:
    service = store.processes.latest_service()
    stale_after = 3 * config.service.heartbeat_seconds
    running = (
        service is not None
        and service.stopped_at is None
        and (now - service.heartbeat_at).total_seconds() <= stale_after
    )
    report["service"] = {
        "running": running,
        "owner": service.owner if service else None,
        "version": service.version if service else None,
        "started_at": _iso(service.started_at) if service else None,
        "heartbeat_age_s": _age(service.heartbeat_at, now) if service else None,
    }
    if not running:
        problems.append("service is not running (no recent heartbeat)")
    totals = store.processes.totals()
    report["studies"] = totals.studies_by_state
    report["jobs"] = totals.jobs_by_state
    report["instances"] = {
        "count": totals.instances,
        "bytes": totals.spool_bytes,
        "last_received_at": _iso(totals.last_received_at),
        "last_received_age_s": _age(totals.last_received_at, now),
    }
    report["associations_open"] = totals.open_associations
    since = now - timedelta(seconds=WORKER_STALE_SECONDS)
    live = store.processes.live_workers(since)
    report["workers"] = [
        {
            "owner": w.owner,
            "model": w.model_name,
            "model_version": w.model_version,
            "provider": w.provider,
            "jobs_done": w.jobs_done,
            "heartbeat_age_s": _age(w.heartbeat_at, now),
        }
        for w in live
    ]
    oldest = store.queue.oldest_queued()
    report["queue"] = {
        "queued": totals.jobs_by_state.get("QUEUED", 0),
        "oldest_queued_age_s": _age(oldest, now),
    }
    if oldest is not None and not live and running:
        problems.append("jobs are queued but no worker is running (is the model missing?)")
    age = _age(oldest, now)
    if age is not None and age > config.service.stuck_queue_seconds:
        problems.append(
            f"the oldest queued job has waited {age:.0f} s "
            f"(more than service.stuck_queue_seconds = {config.service.stuck_queue_seconds:.0f})"
        )
    outbox_counts = store.outbox.counts()
    report["failed"] = {
        "jobs": totals.jobs_by_state.get("FAILED", 0),
        "outbox_dead": sum(c.get("DEAD", 0) for c in outbox_counts.values()),
    }
    report["model"]["providers"] = sorted({w.provider for w in live})
    _add_priority(report, store, now)
    _add_retention(report, store, config, now)
    _add_destinations(report, outbox_counts, config, problems)
    _add_report_feeds(report, config, problems)


def _add_retention(report: dict[str, Any], store: Database, config: Config, now: datetime) -> None:
    """What ``[retention]`` keeps and what its rounds removed (runs of the last priority_days)."""
    summary = store.retention.summary()
    report["retention"] = {
        "spool_days": config.retention.spool_days,
        "priority_days": config.retention.priority_days,
        "last_run_at": _iso(summary.last_run_at),
        "last_run_age_s": _age(summary.last_run_at, now),
        "instances_on_disk": summary.instances_on_disk,
        "oldest_on_disk_age_s": _age(summary.oldest_on_disk_at, now),
        "studies_purged": summary.totals.studies_purged,
        "files_removed": summary.totals.files_removed,
        "bytes_freed": summary.totals.bytes_freed,
        "studies_deleted": summary.totals.studies_deleted,
    }


def _add_priority(report: dict[str, Any], store: Database, now: datetime) -> None:
    """The priority table by state, and the ranked unreported positives."""
    report["priority"] = store.priority.counts()
    worklist = store.priority.worklist(limit=STATUS_WORKLIST_LIMIT)
    report["unreported_positives"] = {
        "total": report["priority"].get(PriorityState.FLAGGED.value, 0),
        "oldest_age_s": _age(store.priority.oldest_unreported_flag(), now),
        "studies": [worklist_entry(row, now) for row in worklist],
    }


def worklist_entry(row: PriorityRow, now: datetime) -> dict[str, Any]:
    """One unreported positive for ``status`` and ``worklist`` (UIDs only, no patient data)."""
    return {
        "rank": row.rank,
        "study_uid": row.study_uid,
        "score": None if row.score is None else round(row.score, 4),
        "operating_point": row.operating_point,
        "model_version": row.model_version,
        "study_date": row.study_date,
        "received_at": _iso(row.received_at),
        "flagged_at": _iso(row.flagged_at),
        "age_s": _age(row.flagged_at, now),
        "escalations": row.escalations,
    }


def _add_report_feeds(report: dict[str, Any], config: Config, problems: list[str]) -> None:
    """The report-status feeds: the PACS asked by C-FIND, and the HL7 listener."""
    pacs: dict[str, Any] = {"pacs": config.reconcile.pacs or None}
    if config.reconcile.pacs:
        target = parse_destination(config.reconcile.pacs)
        what = _probe(target, config, min(config.reconcile.timeout_seconds, 5.0), pacs)
        if not pacs["reachable"]:
            problems.append(
                f"PACS {config.reconcile.pacs} (report look-up) does not {what}: {pacs['detail']}"
            )
    report["reconcile"] = pacs
    hl7: dict[str, Any] = {"port": config.hl7.port or None}
    if config.hl7.port:
        host = _local_address(config.hl7.bind)
        hl7["listening"] = _accepts(host, config.hl7.port)
        if not hl7["listening"]:
            problems.append(f"HL7 listener {host}:{config.hl7.port} does not accept connections")
    report["hl7"] = hl7
    web: dict[str, Any] = {"port": config.web.port or None}
    if config.web.port:
        host = _local_address(config.web.bind)
        web["tls"] = config.web.tls_cert_file is not None
        web["listening"] = _accepts(host, config.web.port)
        if not web["listening"]:
            problems.append(f"web interface {host}:{config.web.port} does not accept connections")
    report["web"] = web


def _probe(
    target: Destination | WebDestination, config: Config, timeout: float, into: dict[str, Any]
) -> str:
    """Probe a DICOM peer with C-ECHO, a DICOMweb one (no echo in DICOMweb) by connecting;
    ``reachable`` and ``detail`` go *into*; returns what was asked of it, for the problem."""
    if isinstance(target, WebDestination):
        reachable = _accepts(target.host, target.port)
        into.update(
            reachable=reachable, detail="accepts connections" if reachable else "no connection"
        )
        return "accept connections"
    into.update(echo_destination(target, config.dicom.ae_title, config.delivery.tls, timeout))
    return "answer C-ECHO"


def _accepts(host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether something accepts TCP connections there (for listeners without a C-ECHO)."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _add_destinations(
    report: dict[str, Any],
    counts: dict[str, dict[str, int]],
    config: Config,
    problems: list[str],
) -> None:
    """Each configured destination: C-ECHO, and its outbox by state (*counts*:
    destination -> state -> items, from ``Store.outbox_counts``)."""
    delivery = config.delivery
    report["destinations"] = []
    for destination in delivery.parsed_destinations:
        name = str(destination)
        echo: dict[str, Any] = {}
        what = _probe(destination, config, min(delivery.timeout_seconds, 5.0), echo)
        outbox = {state.value: counts.get(name, {}).get(state.value, 0) for state in OutboxState}
        report["destinations"].append({"destination": name, **echo, "outbox": outbox})
        if not echo["reachable"]:
            problems.append(f"destination {name} does not {what}: {echo['detail']}")
        if outbox["DEAD"]:
            problems.append(
                f"{outbox['DEAD']} result object(s) for {name} gave up: "
                "see 'triage-node outbox list --state DEAD', then 'outbox retry'"
            )
