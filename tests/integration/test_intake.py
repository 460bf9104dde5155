"""Intake (associations, instances, study completeness) on SQLite and on PostgreSQL (the same
tests, both backends)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select

from tests.support.records import header, spooled
from triage_node.db.database import Database
from triage_node.db.intake import StudyState
from triage_node.db.queue import JobState
from triage_node.db.schema import instances, jobs, studies
from triage_node.domain import AssociationEnd

T0 = datetime(2026, 11, 23, 8, 0, 0, 123456, tzinfo=UTC)
SETTLE = timedelta(seconds=2)
STALE = timedelta(seconds=300)


def count(store: Database, table, *where) -> int:  # type: ignore[no-untyped-def]
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


def test_record_and_resend_is_one_row(store: Database) -> None:
    h = header()
    first = store.intake.record_instance(h, spooled(h, 100), None, T0)
    again = store.intake.record_instance(h, spooled(h, 250, replaced=True), None, T0 + SETTLE)
    assert first.instance_id == again.instance_id and again.replaced
    assert count(store, instances) == 1 and count(store, studies) == 1
    with store.engine.connect() as conn:
        size = conn.execute(select(instances.c.size_bytes)).scalar_one()
        received = conn.execute(select(instances.c.received_at)).scalar_one()
    assert size == 250  # the latest bytes
    assert received == T0 + SETTLE  # aware UTC round trip, microseconds kept


def test_study_settles_then_queues_once(store: Database) -> None:
    store.intake.record_instance(header(sop="1.1"), spooled(header(sop="1.1")), None, T0)
    store.intake.record_instance(
        header(sop="1.2"), spooled(header(sop="1.2")), None, T0 + timedelta(seconds=1)
    )
    assert store.intake.ready_studies(T0 + timedelta(seconds=2), SETTLE, STALE) == []
    ready = store.intake.ready_studies(T0 + timedelta(seconds=3), SETTLE, STALE)
    assert [r.study_uid for r in ready] == ["1.2.3"]
    assert store.queue.enqueue(ready[0], T0 + timedelta(seconds=3)) is not None
    assert store.queue.enqueue(ready[0], T0 + timedelta(seconds=3)) is None  # not twice
    assert store.intake.ready_studies(T0 + timedelta(seconds=9), SETTLE, STALE) == []
    assert count(store, jobs, jobs.c.state == JobState.QUEUED.value) == 1


def test_instance_arriving_meanwhile_wins_over_enqueue(store: Database) -> None:
    store.intake.record_instance(header(sop="1.1"), spooled(header(sop="1.1")), None, T0)
    ready = store.intake.ready_studies(T0 + timedelta(seconds=5), SETTLE, STALE)
    store.intake.record_instance(
        header(sop="1.2"), spooled(header(sop="1.2")), None, T0 + timedelta(seconds=5)
    )
    assert store.queue.enqueue(ready[0], T0 + timedelta(seconds=5)) is None
    assert count(store, jobs) == 0


def test_late_instance_reopens_study_and_supersedes_waiting_job(store: Database) -> None:
    store.intake.record_instance(header(sop="1.1"), spooled(header(sop="1.1")), None, T0)
    [ready] = store.intake.ready_studies(T0 + timedelta(seconds=5), SETTLE, STALE)
    first_job = store.queue.enqueue(ready, T0 + timedelta(seconds=5))
    late = store.intake.record_instance(
        header(sop="1.2"), spooled(header(sop="1.2")), None, T0 + timedelta(seconds=6)
    )
    assert late.reopened
    [again] = store.intake.ready_studies(T0 + timedelta(seconds=10), SETTLE, STALE)
    assert again.study_id == ready.study_id and again.revision == 2
    second_job = store.queue.enqueue(again, T0 + timedelta(seconds=10))
    assert second_job is not None and second_job != first_job
    assert count(store, studies) == 1
    with store.engine.connect() as conn:
        states = dict(conn.execute(select(jobs.c.id, jobs.c.state)).all())
        study_state = conn.execute(select(studies.c.state)).scalar_one()
    assert states == {first_job: JobState.SUPERSEDED.value, second_job: JobState.QUEUED.value}
    assert study_state == StudyState.QUEUED.value


def test_open_association_holds_study_until_released_or_stale(store: Database) -> None:
    assoc = store.intake.open_association("PACS", "TRIAGE_NODE", "127.0.0.1", T0)
    store.intake.record_instance(header(), spooled(header()), assoc, T0)
    assert store.intake.ready_studies(T0 + timedelta(seconds=10), SETTLE, STALE) == []
    assert len(store.intake.ready_studies(T0 + STALE, SETTLE, STALE)) == 1  # silent too long
    store.intake.close_association(assoc, AssociationEnd.RELEASED, T0 + timedelta(seconds=10))
    assert len(store.intake.ready_studies(T0 + timedelta(seconds=10), SETTLE, STALE)) == 1


def test_lost_associations_of_dead_processes_are_closed(store: Database) -> None:
    assoc = store.intake.open_association("PACS", "TRIAGE_NODE", "127.0.0.1", T0)
    assert store.intake.close_lost_associations(lambda pid: True, T0) == 0
    assert store.intake.close_lost_associations(lambda pid: False, T0) == 1
    assert store.processes.totals().open_associations == 0
    store.intake.close_association(assoc, AssociationEnd.RELEASED, T0)  # no error, no change
