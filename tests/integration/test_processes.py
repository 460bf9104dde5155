"""Heartbeats and totals on SQLite and PostgreSQL (what ``status`` reads)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.support.records import header, spooled
from triage_node.db.database import Database

T0 = datetime(2026, 11, 23, 8, 0, 0, 123456, tzinfo=UTC)
SETTLE = timedelta(seconds=2)
STALE = timedelta(seconds=300)


def test_totals_and_heartbeat(store: Database) -> None:
    store.intake.record_instance(header(), spooled(header(), 1000), None, T0)
    store.processes.service_heartbeat("0.1.0", "TRIAGE_NODE", 11112, T0, starting=True)
    store.processes.service_heartbeat("0.1.0", "TRIAGE_NODE", 11112, T0 + SETTLE)
    totals = store.processes.totals()
    assert totals.studies_by_state == {"RECEIVED": 1}
    assert totals.instances == 1 and totals.spool_bytes == 1000
    assert totals.last_received_at == T0
    service = store.processes.latest_service()
    assert service is not None
    assert service.started_at == T0 and service.heartbeat_at == T0 + SETTLE
    store.processes.service_stopped(T0 + SETTLE)
    assert store.processes.latest_service().stopped_at is not None  # type: ignore[union-attr]
