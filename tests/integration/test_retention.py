"""Retention on SQLite and PostgreSQL with a real spool: what is purged when, and what stays."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from tests.support.records import analyse, header
from triage_node.config import RetentionConfig
from triage_node.db.database import Database
from triage_node.db.outbox import OutboxState
from triage_node.db.priority import ReportSource
from triage_node.db.retention import RetentionCounts
from triage_node.domain import ResultFile, ResultKind
from triage_node.service.retention import Retention
from triage_node.spool import Spool

T0 = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)
DAY = timedelta(days=1)
PACS = "PACS@127.0.0.1:4242"


class World:
    """A store and a spool on disk, and a retention that runs at a chosen time."""

    def __init__(self, store: Database, root: Path) -> None:
        self.store = store
        self.spool = Spool(root)
        self.spool.prepare()
        self.config = RetentionConfig(spool_days=7, priority_days=90)

    def receive(self, study: str, number: int, at: datetime) -> Path:
        h = replace(header(study=study, sop=f"{study}.1.{number}"), accession_number="A" + study)
        partial = self.spool.incoming_dir() / "partial"
        partial.write_bytes(b"DICM" * 100)
        spooled = self.spool.commit(partial, h)
        self.store.intake.record_instance(h, spooled, None, at)
        return self.spool.path_of(spooled.relpath)

    def deliver(self, study: str, at: datetime, state: OutboxState = OutboxState.SENT) -> Path:
        """A result file for the study in the outbox, sent at *at* (or left PENDING or DEAD)."""
        sop = f"{study}.99"
        path = self.spool.write_result(study, sop, b"result")
        result = ResultFile(ResultKind.SR, "1.2.840.10008.5.1.4.1.1.88.34", sop, path)
        self.store.outbox.add(self.study_id(study), 1, [result], [PACS], at)
        [item] = [i for i in self.store.outbox.items() if i.sop_instance_uid == sop]
        if state == OutboxState.SENT:
            self.store.outbox.sent(item.id, 0, at)
        elif state == OutboxState.DEAD:
            self.store.outbox.failed(item.id, None, "down", retry_at=at, max_attempts=1)
        return path

    def study_id(self, study: str) -> int:
        return int(self.rows("select id from studies where study_uid = :u", u=study)[0][0])

    def rows(self, query: str, **params: object) -> list[tuple[object, ...]]:
        with self.store.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(query), params)]

    def count(self, table: str) -> int:
        return int(self.rows(f"select count(*) from {table}")[0][0])  # noqa: S608

    def retain(self, at: datetime) -> Retention:
        retention = Retention(self.store.retention, self.spool, self.config, clock=lambda: at)
        retention.run_once()
        return retention


@pytest.fixture
def world(store: Database, tmp_path: Path) -> World:
    return World(store, tmp_path / "spool")


def test_delivered_study_is_purged_after_spool_days_and_its_row_after_priority_days(
    world: World,
) -> None:
    files = [world.receive("1.5.1", n, T0) for n in (1, 2)]
    analyse(world.store, T0 + timedelta(minutes=1), 0.1)  # negative
    result = world.deliver("1.5.1", T0 + timedelta(minutes=2))

    world.retain(T0 + 6 * DAY)
    assert all(p.exists() for p in [*files, result])
    summary = world.store.retention.summary()
    assert summary.instances_on_disk == 2 and summary.totals.studies_purged == 0

    world.retain(T0 + 7 * DAY + timedelta(minutes=3))
    assert not any(p.exists() for p in [*files, result])
    assert sorted(p.name for p in world.spool.root.iterdir()) == ["incoming", "results"]
    assert world.store.queue.instances_of(world.study_id("1.5.1")) == []
    summary = world.store.retention.summary()
    assert summary.totals == RetentionCounts(1, 3, 2 * 400 + len(b"result"), 0)
    assert summary.instances_on_disk == 0
    assert world.store.priority.row("1.5.1") is not None  # the row stays for priority_days

    world.retain(T0 + 7 * DAY + 89 * DAY)
    assert world.store.priority.row("1.5.1") is not None
    world.retain(T0 + 7 * DAY + 91 * DAY)
    assert world.store.priority.row("1.5.1") is None
    for table in ("studies", "series", "instances", "jobs", "study_results", "image_results"):
        assert world.count(table) == 0, table
    assert world.count("outbox") == 0
    assert world.store.retention.summary().totals.studies_deleted == 1


def test_unreported_positives_and_undelivered_results_keep_their_files(world: World) -> None:
    for study in ("1.6.1", "1.6.2", "1.6.3"):
        world.receive(study, 1, T0)
    analyse(world.store, T0, 0.1)
    world.deliver("1.6.1", T0, OutboxState.PENDING)
    world.deliver("1.6.2", T0, OutboxState.DEAD)
    world.receive("1.6.4", 1, T0)
    analyse(world.store, T0, 0.9)  # positive, flagged, nobody has reported it
    world.deliver("1.6.4", T0)

    world.retain(T0 + 400 * DAY)
    assert world.store.retention.summary().instances_on_disk == 3  # 1.6.3 (kept only) purged
    world.store.priority.mark_reported(ReportSource.CLI, T0 + 400 * DAY, study_uid="1.6.4")
    world.retain(T0 + 408 * DAY)
    assert world.store.retention.summary().instances_on_disk == 2  # reported: purged now
    world.retain(T0 + 495 * DAY)
    remaining = {str(r[0]) for r in world.rows("select study_uid from studies")}
    assert remaining == {"1.6.1", "1.6.2", "1.6.4"}  # 1.6.4: purged at day 408, kept until 498
    world.retain(T0 + 499 * DAY)
    assert (
        world.store.priority.row("1.6.4") is None and world.store.priority.row("1.6.1") is not None
    )


def test_a_purge_cut_short_is_finished_and_a_late_instance_is_kept(world: World) -> None:
    early = world.receive("1.7.1", 1, T0)
    analyse(world.store, T0, 0.1)
    world.deliver("1.7.1", T0)
    # A crash after the files went but before the database said so: the next round finishes.
    world.spool.purge_study("1.7.1", ["1.7.1/1.7.1.1/1.7.1.1.1.dcm"])
    assert not early.exists()
    world.retain(T0 + 8 * DAY)
    assert world.store.retention.summary().instances_on_disk == 0

    late = world.receive("1.7.1", 2, T0 + 9 * DAY)  # the study re-opens with what is on disk
    assert [
        r.sop_instance_uid for r in world.store.queue.instances_of(world.study_id("1.7.1"))
    ] == ["1.7.1.1.2"]
    world.retain(T0 + 9 * DAY + timedelta(hours=1))
    assert late.exists() and world.store.retention.summary().instances_on_disk == 1
