"""Escalation on SQLite and PostgreSQL: due once per interval, and the latest KOS sent again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.support.records import analyse, receive
from triage_node.db.database import Database
from triage_node.db.outbox import OutboxState
from triage_node.db.priority import ReportSource
from triage_node.domain import ResultFile

T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
LEASE = timedelta(seconds=60)
PACS = "PACS@127.0.0.1:4242"


def test_escalation_once_per_interval_resends_the_latest_flag(store: Database) -> None:
    receive(store, "1.4.1", T0)
    analyse(store, T0, 0.8)
    sid = store.report_checks.due(T0, timedelta(0), 1)[0][0]
    ko = ResultFile("ko", "1.2.840.10008.5.1.4.1.1.88.59", "2.25.9", Path("/r/ko.dcm"))
    sr = ResultFile("sr", "1.2.840.10008.5.1.4.1.1.88.34", "2.25.8", Path("/r/sr.dcm"))
    store.outbox.add(sid, 1, [ko, sr], [PACS], T0)
    for item in store.outbox.due(T0):
        store.outbox.sent(item.id, 0, T0)

    after, repeat = timedelta(hours=1), timedelta(hours=2)
    assert store.escalations.due(T0 + timedelta(minutes=59), after, repeat) == []
    [due] = store.escalations.due(T0 + after, after, repeat)
    assert due.study_uid == "1.4.1" and due.accession_number == "ACC1" and due.escalations == 0
    assert store.escalations.escalate(due, T0 + after) == 1
    assert (
        store.escalations.escalate(due, T0 + after) is None
    )  # counted once, however often it is asked
    [pending] = store.outbox.due(T0 + after)
    assert pending.kind == "ko" and pending.attempts == 0
    assert store.escalations.due(T0 + after + timedelta(minutes=119), after, repeat) == []
    [again] = store.escalations.due(T0 + after + repeat, after, repeat)
    assert again.escalations == 1
    assert store.escalations.escalate(again, T0 + after + repeat) == 1
    row = store.priority.row("1.4.1")
    assert row is not None and row.escalations == 2 and row.escalated_at == T0 + after + repeat
    store.priority.mark_reported(ReportSource.CLI, T0 + timedelta(days=1), study_uid="1.4.1")
    assert store.escalations.due(T0 + timedelta(days=2), after, repeat) == []
    assert store.outbox.counts()[PACS][OutboxState.SENT.value] == 1
