"""Report checks on SQLite and PostgreSQL: which unreported positives are due for a PACS look-up."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.support.records import analyse, receive
from triage_node.db.database import Database
from triage_node.db.priority import ReportSource

T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
LEASE = timedelta(seconds=60)
PACS = "PACS@127.0.0.1:4242"


def test_studies_to_check_least_recently_first(store: Database) -> None:
    for n in range(3):
        receive(store, f"1.5.{n}", T0)
    analyse(store, T0, 0.6)
    every = timedelta(minutes=5)
    assert [uid for _, uid in store.report_checks.due(T0, every, 10)] == ["1.5.0", "1.5.1", "1.5.2"]
    first_id = store.report_checks.due(T0, every, 1)[0][0]
    store.report_checks.checked(first_id, T0)
    assert [uid for _, uid in store.report_checks.due(T0, every, 10)] == ["1.5.1", "1.5.2"]
    later = T0 + every
    assert [uid for _, uid in store.report_checks.due(later, every, 10)][-1] == "1.5.0"
    store.priority.mark_reported(ReportSource.CLI, later, study_uid="1.5.1")
    assert "1.5.1" not in [uid for _, uid in store.report_checks.due(later, every, 10)]
