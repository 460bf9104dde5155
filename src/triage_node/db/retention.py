"""Retention: spooled files past their time, study rows past theirs, and what each round removed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import (
    exists,
    func,
    not_,
    or_,
    select,
    update,
)

from triage_node.db.engine import Aggregate
from triage_node.db.intake import StudyState
from triage_node.db.outbox import OutboxState
from triage_node.db.priority import UNREPORTED_POSITIVE
from triage_node.db.schema import (
    image_results,
    instances,
    jobs,
    outbox,
    retention_runs,
    series,
    studies,
    study_results,
)


@dataclass(frozen=True, slots=True)
class PurgeCandidate:
    """A study whose spooled files are past retention: the files still on disk."""

    study_id: int
    study_uid: str
    files: list[tuple[int, str, int]]  # instance id, spool-relative path, size in bytes


@dataclass(frozen=True, slots=True)
class RetentionCounts:
    """What retention removed: in one round, or in the rounds ``status`` reports on."""

    studies_purged: int = 0  # studies whose spooled files were removed
    files_removed: int = 0
    bytes_freed: int = 0
    studies_deleted: int = 0  # study rows past retention.priority_days


@dataclass(frozen=True, slots=True)
class RetentionSummary:
    """What retention has done and what the spool still holds, for ``status``."""

    last_run_at: datetime | None
    totals: RetentionCounts
    instances_on_disk: int
    oldest_on_disk_at: datetime | None


class RetentionRecords(Aggregate):
    """What may be removed, what was, and what the spool still holds."""

    def purge_candidates(self, delivered_before: datetime, limit: int) -> list[PurgeCandidate]:
        """Analysed studies whose results were all delivered (or kept only) before
        *delivered_before*, with spooled files still on disk. Studies still waiting for a
        report stay (escalation re-sends their KOS), and so do studies with results not yet
        sent or given up on (``outbox retry`` would need the files)."""
        undelivered = exists().where(
            outbox.c.study_id == studies.c.id,
            or_(
                outbox.c.state != OutboxState.SENT.value,
                outbox.c.sent_at > delivered_before,
            ),
        )
        query = (
            select(studies.c.id, studies.c.study_uid)
            .where(
                studies.c.state == StudyState.INFERRED.value,
                studies.c.purged_at.is_(None),
                studies.c.inferred_at <= delivered_before,
                not_(UNREPORTED_POSITIVE),
                not_(undelivered),
            )
            .order_by(studies.c.inferred_at, studies.c.id)
            .limit(limit)
        )
        with self._connect() as conn:
            found = conn.execute(query).all()
            files = conn.execute(
                select(
                    instances.c.study_id,
                    instances.c.id,
                    instances.c.path,
                    instances.c.size_bytes,
                ).where(
                    instances.c.study_id.in_([row.id for row in found]),
                    instances.c.purged_at.is_(None),
                    instances.c.received_at <= delivered_before,
                )
            ).all()
        by_study: dict[int, list[tuple[int, str, int]]] = {row.id: [] for row in found}
        for study_id, instance_id, path, size in files:
            by_study[study_id].append((int(instance_id), str(path), int(size)))
        return [PurgeCandidate(int(r.id), str(r.study_uid), by_study[r.id]) for r in found]

    def purged(self, study_id: int, instance_ids: Sequence[int], now: datetime) -> None:
        """Record that these files are gone; the study counts as purged once none is left
        (an instance that arrived meanwhile keeps it in the spool)."""
        with self._begin() as conn:
            if instance_ids:
                conn.execute(
                    update(instances)
                    .where(instances.c.id.in_(list(instance_ids)))
                    .values(purged_at=now)
                )
            left = exists().where(instances.c.study_id == study_id, instances.c.purged_at.is_(None))
            conn.execute(
                update(studies).where(studies.c.id == study_id, not_(left)).values(purged_at=now)
            )

    def delete_old_studies(self, idle_before: datetime, limit: int) -> list[str]:
        """Delete studies purged from the spool with nothing happening since *idle_before*
        (received, analysed, reported), with every row that belongs to them; unreported
        positives are kept. Returns their Study UIDs."""
        chosen = (
            select(studies.c.id, studies.c.study_uid)
            .where(
                studies.c.purged_at <= idle_before,
                studies.c.last_received_at <= idle_before,
                or_(studies.c.inferred_at.is_(None), studies.c.inferred_at <= idle_before),
                or_(studies.c.reported_at.is_(None), studies.c.reported_at <= idle_before),
                not_(UNREPORTED_POSITIVE),
            )
            .order_by(studies.c.id)
            .limit(limit)
        )
        with self._begin() as conn:
            rows = conn.execute(chosen).all()
            ids = [row.id for row in rows]
            if ids:
                result_ids = select(study_results.c.id).where(study_results.c.study_id.in_(ids))
                conn.execute(
                    image_results.delete().where(image_results.c.study_result_id.in_(result_ids))
                )
                for table in (study_results, jobs, outbox, instances, series):
                    conn.execute(table.delete().where(table.c.study_id.in_(ids)))
                conn.execute(studies.delete().where(studies.c.id.in_(ids)))
        return [str(row.study_uid) for row in rows]

    def record_run(
        self, now: datetime, counts: RetentionCounts, *, keep_runs_after: datetime
    ) -> None:
        """Keep the figures of one retention run (and forget runs older than the rows)."""
        with self._begin() as conn:
            conn.execute(
                retention_runs.insert().values(
                    ran_at=now,
                    studies_purged=counts.studies_purged,
                    files_removed=counts.files_removed,
                    bytes_freed=counts.bytes_freed,
                    studies_deleted=counts.studies_deleted,
                )
            )
            conn.execute(retention_runs.delete().where(retention_runs.c.ran_at < keep_runs_after))

    def summary(self) -> RetentionSummary:
        with self._connect() as conn:
            last, purged, removed, freed, deleted = conn.execute(
                select(
                    func.max(retention_runs.c.ran_at),
                    func.coalesce(func.sum(retention_runs.c.studies_purged), 0),
                    func.coalesce(func.sum(retention_runs.c.files_removed), 0),
                    func.coalesce(func.sum(retention_runs.c.bytes_freed), 0),
                    func.coalesce(func.sum(retention_runs.c.studies_deleted), 0),
                )
            ).one()
            on_disk, oldest = conn.execute(
                select(func.count(instances.c.id), func.min(instances.c.received_at)).where(
                    instances.c.purged_at.is_(None)
                )
            ).one()
        return RetentionSummary(
            last_run_at=last,
            totals=RetentionCounts(int(purged), int(removed), int(freed), int(deleted)),
            instances_on_disk=int(on_disk),
            oldest_on_disk_at=oldest,
        )
