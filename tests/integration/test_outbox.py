"""The outbox of result objects, on SQLite and PostgreSQL: no duplicates, retries, dead items."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from tests.support.records import header
from triage_node.db.database import Database
from triage_node.db.outbox import OutboxState
from triage_node.db.schema import studies
from triage_node.domain import InstanceHeader, ResultFile, ResultKind, SpooledFile

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
PACS, ARCHIVE = "PACS@127.0.0.1:4242", "ARCHIVE@10.0.0.9:104"
FILES = [
    ResultFile(
        ResultKind.SR, "1.2.840.10008.5.1.4.1.1.88.34", "2.25.1", Path("/spool/results/sr.dcm")
    ),
    ResultFile(ResultKind.SC, "1.2.840.10008.5.1.4.1.1.7", "2.25.2", Path("/spool/results/sc.dcm")),
]


def study_id(store: Database) -> int:
    h: InstanceHeader = header()
    store.intake.record_instance(h, SpooledFile("a/b/c.dcm", 10, False), None, T0)
    with store.engine.connect() as conn:
        return int(conn.execute(select(studies.c.id)).scalar_one())


def test_one_row_per_object_and_destination_and_resends_add_nothing(store: Database) -> None:
    sid = study_id(store)
    store.outbox.add(sid, 1, FILES, [PACS, ARCHIVE], T0)
    store.outbox.add(sid, 1, FILES, [PACS, ARCHIVE], T0 + timedelta(minutes=1))  # a resend
    items = store.outbox.items()
    assert len(items) == 4
    assert {(i.destination, i.sop_instance_uid) for i in items} == {
        (d, f.sop_instance_uid) for d in (PACS, ARCHIVE) for f in FILES
    }
    assert all(i.state == OutboxState.PENDING and i.study_uid == "1.2.3" for i in items)
    assert store.outbox.counts() == {PACS: {"PENDING": 2}, ARCHIVE: {"PENDING": 2}}


def test_due_items_sent_failed_and_dead(store: Database) -> None:
    sid = study_id(store)
    store.outbox.add(sid, 1, FILES, [PACS], T0)
    due = store.outbox.due(T0)
    assert [i.kind for i in due] == ["sr", "sc"]
    sr, sc = due
    store.outbox.sent(sr.id, 0x0000, T0)
    assert (
        store.outbox.failed(
            sc.id, 0xA700, "out of resources", retry_at=T0 + timedelta(seconds=30), max_attempts=2
        )
        == OutboxState.PENDING
    )
    assert store.outbox.due(T0 + timedelta(seconds=29)) == []
    [again] = store.outbox.due(T0 + timedelta(seconds=30))
    assert again.id == sc.id and again.attempts == 1 and again.last_status == 0xA700
    assert (
        store.outbox.failed(
            sc.id, None, "association aborted", retry_at=T0 + timedelta(hours=1), max_attempts=2
        )
        == OutboxState.DEAD
    )
    assert store.outbox.due(T0 + timedelta(days=1)) == []
    [dead] = store.outbox.items(OutboxState.DEAD)
    assert dead.last_error == "association aborted" and dead.attempts == 2
    [sent] = store.outbox.items(OutboxState.SENT)
    assert sent.sent_at == T0 and sent.last_status == 0

    assert store.outbox.retry(T0 + timedelta(days=1), ids=[sent.id]) == 0  # only DEAD revives
    assert store.outbox.retry(T0 + timedelta(days=1)) == 1
    [revived] = store.outbox.due(T0 + timedelta(days=1))
    assert revived.id == sc.id and revived.attempts == 0
    assert store.outbox.counts() == {PACS: {"SENT": 1, "PENDING": 1}}
