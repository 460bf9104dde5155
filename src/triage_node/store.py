"""Every query the node runs, in one place. Callers get frozen records, never rows or sessions.

The same statements run on SQLite and PostgreSQL (``INSERT ... ON CONFLICT`` exists in both).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Table,
    and_,
    bindparam,
    case,
    exists,
    func,
    not_,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from triage_node.db import (
    associations,
    image_results,
    instances,
    jobs,
    outbox,
    retention_runs,
    series,
    services,
    studies,
    study_results,
    workers,
)
from triage_node.domain import (
    OPERATING_POINT_ORDER,
    AssociationEnd,
    ClaimedJob,
    InstanceHeader,
    InstanceRef,
    JobState,
    OutboxItem,
    OutboxState,
    Outcome,
    PriorityRow,
    PriorityState,
    ReadyStudy,
    RecordedInstance,
    ReportSource,
    ResultFile,
    SpooledFile,
    StudyAnalysis,
    StudyState,
)


def process_owner() -> str:
    """``host:pid`` naming this process in rows it owns (associations, services)."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    owner: str
    version: str
    ae_title: str
    port: int
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    owner: str
    model_name: str
    model_version: str
    provider: str
    jobs_done: int
    heartbeat_at: datetime


@dataclass(frozen=True, slots=True)
class Totals:
    """What the database holds, for ``status``."""

    studies_by_state: dict[str, int]
    jobs_by_state: dict[str, int]
    instances: int
    spool_bytes: int
    last_received_at: datetime | None
    open_associations: int


@dataclass(frozen=True, slots=True)
class EscalationDue:
    """An unreported positive due for escalation. The accession number is for the RIS message
    only (never logged)."""

    study_id: int
    study_uid: str
    accession_number: str
    escalations: int
    escalated_at: datetime | None


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


@dataclass(frozen=True, slots=True)
class _RecordStatements:
    previous_state: Any
    study: Any
    series: Any
    instance: Any
    count: Any


class Store:
    """The node's database access. Thread-safe; one per process."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._dialect_insert: Callable[[Table], Any] = (
            postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        )
        self._record = self._record_statements()

    # -- associations ------------------------------------------------------------------------

    def open_association(
        self, calling_ae: str, called_ae: str, peer_address: str, now: datetime
    ) -> int:
        with self.engine.begin() as conn:
            row = conn.execute(
                associations.insert()
                .values(
                    owner=process_owner(),
                    calling_ae=calling_ae[:16],
                    called_ae=called_ae[:16],
                    peer_address=peer_address[:64],
                    started_at=now,
                )
                .returning(associations.c.id)
            ).one()
        return int(row.id)

    def close_association(self, association_id: int, reason: AssociationEnd, now: datetime) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(associations)
                .where(associations.c.id == association_id, associations.c.ended_at.is_(None))
                .values(ended_at=now, end_reason=reason.value)
            )

    def close_lost_associations(self, is_alive: Callable[[int], bool], now: datetime) -> int:
        """Mark associations of dead receiver processes on this host as LOST."""
        host = socket.gethostname()
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(associations.c.id, associations.c.owner).where(
                    associations.c.ended_at.is_(None),
                    associations.c.owner.like(f"{host}:%"),
                )
            ).all()
            lost = [r.id for r in rows if not is_alive(int(r.owner.rpartition(":")[2]))]
            if lost:
                conn.execute(
                    update(associations)
                    .where(associations.c.id.in_(lost))
                    .values(ended_at=now, end_reason=AssociationEnd.LOST.value)
                )
        return len(lost)

    def recover_interrupted_jobs(self, is_alive: Callable[[int], bool], now: datetime) -> int:
        """At service start: jobs running in dead worker processes of this host go back to the
        queue at once, and the interrupted attempt is not counted (the service stopped, not the
        job; a job that kills its worker while the service runs still counts, by lease expiry)."""
        host = socket.gethostname()
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(jobs.c.id, jobs.c.lease_owner).where(
                    jobs.c.state == JobState.RUNNING.value,
                    jobs.c.lease_owner.like(f"{host}:%"),
                )
            ).all()
            interrupted = [
                r.id for r in rows if not is_alive(int(r.lease_owner.rpartition(":")[2]))
            ]
            if interrupted:
                conn.execute(
                    update(jobs)
                    .where(jobs.c.id.in_(interrupted), jobs.c.state == JobState.RUNNING.value)
                    .values(
                        state=JobState.QUEUED.value,
                        lease_owner=None,
                        lease_expires_at=None,
                        run_after=now,
                        attempts=case((jobs.c.attempts > 0, jobs.c.attempts - 1), else_=0),
                        last_error="interrupted: the service stopped",
                    )
                )
        return len(interrupted)

    # -- instances ---------------------------------------------------------------------------

    def _record_statements(self) -> _RecordStatements:
        """The four statements of :meth:`record_instance`, built once with bound parameters:
        building them per call cost more than the commit (~1.2 ms per instance, profiled)."""
        insert = self._dialect_insert
        received = StudyState.RECEIVED.value
        study = insert(studies).values(
            study_uid=bindparam("study_uid"),
            state=received,
            revision=1,
            accession_number=bindparam("accession_number"),
            study_date=bindparam("study_date"),
            first_received_at=bindparam("now"),
            last_received_at=bindparam("now"),
        )
        series_insert = insert(series).values(
            study_id=bindparam("study_id"),
            series_uid=bindparam("series_uid"),
            modality=bindparam("modality"),
            body_part=bindparam("body_part"),
            description=bindparam("description"),
        )
        columns = (
            "study_id",
            "series_id",
            "sop_class_uid",
            "transfer_syntax_uid",
            "path",
            "size_bytes",
            "association_id",
            "received_at",
        )
        instance_values: dict[str, Any] = {c: bindparam(c) for c in columns}
        return _RecordStatements(
            previous_state=select(studies.c.state).where(
                studies.c.study_uid == bindparam("study_uid")
            ),
            study=study.on_conflict_do_update(
                index_elements=[studies.c.study_uid],
                set_={
                    "last_received_at": bindparam("now"),
                    "revision": case(
                        (studies.c.state != received, studies.c.revision + 1),
                        else_=studies.c.revision,
                    ),
                    "state": received,
                    "purged_at": None,  # it has a file on disk again
                },
            ).returning(studies.c.id),
            series=series_insert.on_conflict_do_update(
                index_elements=[series.c.series_uid],
                set_={"modality": series_insert.excluded.modality},
            ).returning(series.c.id),
            instance=insert(instances)
            .values(sop_instance_uid=bindparam("sop_instance_uid"), **instance_values)
            .on_conflict_do_update(
                index_elements=[instances.c.sop_instance_uid],
                set_={**instance_values, "purged_at": None},  # a resend after retention
            )
            .returning(instances.c.id),
            count=update(associations)
            .where(associations.c.id == bindparam("association"))
            .values(instances=associations.c.instances + 1),
        )

    def record_instance(
        self,
        header: InstanceHeader,
        spooled: SpooledFile,
        association_id: int | None,
        now: datetime,
    ) -> RecordedInstance:
        """Record a spooled instance; re-open its study if it was already queued or processed.

        One transaction: when it returns, the instance is committed.
        """
        sql = self._record
        with self.engine.begin() as conn:
            previous = conn.execute(
                sql.previous_state, {"study_uid": header.study_uid}
            ).one_or_none()
            reopened = previous is not None and previous.state != StudyState.RECEIVED
            study_id = conn.execute(
                sql.study,
                {
                    "study_uid": header.study_uid,
                    "accession_number": header.accession_number[:16],
                    "study_date": header.study_date[:8],
                    "now": now,
                },
            ).scalar_one()
            series_id = conn.execute(
                sql.series,
                {
                    "study_id": study_id,
                    "series_uid": header.series_uid,
                    "modality": header.modality[:16],
                    "body_part": header.body_part[:64],
                    "description": header.series_description[:64],
                },
            ).scalar_one()
            instance_id = conn.execute(
                sql.instance,
                {
                    "sop_instance_uid": header.sop_instance_uid,
                    "study_id": study_id,
                    "series_id": series_id,
                    "sop_class_uid": header.sop_class_uid,
                    "transfer_syntax_uid": header.transfer_syntax_uid,
                    "path": spooled.relpath,
                    "size_bytes": spooled.size,
                    "association_id": association_id,
                    "received_at": now,
                },
            ).scalar_one()
            if association_id is not None:
                conn.execute(sql.count, {"association": association_id})
        return RecordedInstance(
            study_id=int(study_id),
            instance_id=int(instance_id),
            replaced=spooled.replaced,
            reopened=reopened,
        )

    # -- study completeness ------------------------------------------------------------------

    def ready_studies(
        self, now: datetime, settle: timedelta, stale: timedelta, limit: int = 100
    ) -> list[ReadyStudy]:
        """Studies quiet for *settle* whose sending associations have all ended.

        An association still open but silent for *stale* no longer holds a study back (its
        receiver may have died on another host, or the peer may keep associations open).
        """
        open_sender = exists(
            select(instances.c.id)
            .join(associations, associations.c.id == instances.c.association_id)
            .where(instances.c.study_id == studies.c.id, associations.c.ended_at.is_(None))
        )
        query = (
            select(
                studies.c.id, studies.c.study_uid, studies.c.revision, studies.c.last_received_at
            )
            .where(
                studies.c.state == StudyState.RECEIVED.value,
                studies.c.last_received_at <= now - settle,
                or_(studies.c.last_received_at <= now - stale, not_(open_sender)),
            )
            .order_by(studies.c.last_received_at)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [
                ReadyStudy(
                    study_id=r.id,
                    study_uid=r.study_uid,
                    revision=r.revision,
                    last_received_at=r.last_received_at,
                )
                for r in conn.execute(query)
            ]

    def enqueue(self, study: ReadyStudy, now: datetime) -> int | None:
        """Queue an analysis job for a settled study; None if it changed meanwhile.

        A job still waiting for the same study is superseded, so a re-opened study is analysed
        once, with all its instances.
        """
        with self.engine.begin() as conn:
            claimed = conn.execute(
                update(studies)
                .where(
                    studies.c.id == study.study_id,
                    studies.c.state == StudyState.RECEIVED.value,
                    studies.c.last_received_at == study.last_received_at,
                )
                .values(state=StudyState.QUEUED.value, queued_at=now)
            )
            if claimed.rowcount != 1:
                return None
            conn.execute(
                update(jobs)
                .where(jobs.c.study_id == study.study_id, jobs.c.state == JobState.QUEUED.value)
                .values(state=JobState.SUPERSEDED.value, finished_at=now)
            )
            job_id = conn.execute(
                jobs.insert()
                .values(
                    study_id=study.study_id,
                    study_revision=study.revision,
                    state=JobState.QUEUED.value,
                    created_at=now,
                    run_after=now,
                )
                .returning(jobs.c.id)
            ).scalar_one()
        return int(job_id)

    # -- job queue ---------------------------------------------------------------------------

    def claim(self, owner: str, now: datetime, lease: timedelta) -> ClaimedJob | None:
        """Take the oldest runnable job with a lease; None when there is none.

        PostgreSQL: ``FOR UPDATE SKIP LOCKED``, so workers never wait for or share a job.
        SQLite: the write transaction (BEGIN IMMEDIATE) makes the claim atomic.
        """
        with self.engine.begin() as conn:
            candidate = (
                select(jobs.c.id)
                .where(jobs.c.state == JobState.QUEUED.value, jobs.c.run_after <= now)
                .order_by(jobs.c.run_after, jobs.c.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            job_id = conn.execute(candidate).scalar_one_or_none()
            if job_id is None:
                return None
            row = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state == JobState.QUEUED.value)
                .values(
                    state=JobState.RUNNING.value,
                    lease_owner=owner,
                    lease_expires_at=now + lease,
                    attempts=jobs.c.attempts + 1,
                )
                .returning(jobs.c.study_id, jobs.c.study_revision, jobs.c.attempts)
            ).one_or_none()
            if row is None:
                return None
            study_uid = conn.execute(
                select(studies.c.study_uid).where(studies.c.id == row.study_id)
            ).scalar_one()
        return ClaimedJob(job_id, row.study_id, study_uid, row.study_revision, row.attempts)

    def extend_lease(self, job_id: int, owner: str, until: datetime) -> bool:
        """Keep a long job's lease; False if the lease was lost (another worker took it)."""
        with self.engine.begin() as conn:
            result = conn.execute(
                update(jobs)
                .where(
                    jobs.c.id == job_id,
                    jobs.c.lease_owner == owner,
                    jobs.c.state == JobState.RUNNING.value,
                )
                .values(lease_expires_at=until)
            )
        return result.rowcount == 1

    def requeue_expired(self, now: datetime, max_attempts: int) -> tuple[int, int]:
        """Jobs whose worker died: back to the queue, or FAILED after *max_attempts*.

        Returns (requeued, failed).
        """
        expired = and_(jobs.c.state == JobState.RUNNING.value, jobs.c.lease_expires_at < now)
        with self.engine.begin() as conn:
            failed_ids = list(
                conn.execute(
                    select(jobs.c.id).where(expired, jobs.c.attempts >= max_attempts)
                ).scalars()
            )
            for job_id in failed_ids:
                self._finish_failed(conn, job_id, "worker lost (lease expired) too often", now)
            requeued = conn.execute(
                update(jobs)
                .where(expired, jobs.c.attempts < max_attempts)
                .values(
                    state=JobState.QUEUED.value,
                    lease_owner=None,
                    run_after=now,
                    last_error="worker lost (lease expired)",
                )
            ).rowcount
        return int(requeued), len(failed_ids)

    def instances_of(self, study_id: int) -> list[InstanceRef]:
        """The study's stored instances in arrival order (selection reads each file's header)."""
        query = (
            select(instances.c.id, instances.c.sop_instance_uid, instances.c.path)
            .where(instances.c.study_id == study_id, instances.c.purged_at.is_(None))
            .order_by(instances.c.id)
        )
        with self.engine.connect() as conn:
            return [InstanceRef(*row) for row in conn.execute(query)]

    def _owns(self, conn: Any, job: ClaimedJob, owner: str) -> bool:
        return (
            conn.execute(
                select(jobs.c.id).where(
                    jobs.c.id == job.job_id,
                    jobs.c.lease_owner == owner,
                    jobs.c.state == JobState.RUNNING.value,
                )
            ).scalar_one_or_none()
            is not None
        )

    def complete(self, job: ClaimedJob, owner: str, analysis: StudyAnalysis, now: datetime) -> bool:
        """Store the results and finish the job, in one transaction; False if the lease was lost."""
        with self.engine.begin() as conn:
            if not self._owns(conn, job, owner):
                return False
            # The high-sensitivity threshold decides the outcome; reaching the high-specificity
            # point means the score passed both (StudyAnalysis.outcome / .operating_point).
            result_id = conn.execute(
                study_results.insert()
                .values(
                    job_id=job.job_id,
                    study_id=job.study_id,
                    study_revision=job.study_revision,
                    outcome=analysis.outcome.value,
                    score=analysis.score,
                    operating_point=analysis.operating_point,
                    positive_high_sensitivity=analysis.outcome == Outcome.POSITIVE,
                    positive_high_specificity=analysis.operating_point == "high_specificity",
                    model_name=analysis.model_name,
                    model_version=analysis.model_version,
                    provider=analysis.provider,
                    images=len(analysis.images),
                    skipped=len(analysis.skipped),
                    preprocess_ms=sum(i.preprocess_ms for i in analysis.images),
                    inference_ms=analysis.inference_ms,
                    created_at=now,
                )
                .returning(study_results.c.id)
            ).scalar_one()
            rows: list[dict[str, Any]] = [
                {
                    "study_result_id": result_id,
                    "instance_id": i.instance_id,
                    "probability": i.probability,
                    "peak_row": i.peak_row,
                    "peak_column": i.peak_column,
                    "peak_value": i.peak_value,
                    "peak_area": i.peak_area,
                    "skip_reason": None,
                }
                for i in analysis.images
            ] + [
                {
                    "study_result_id": result_id,
                    "instance_id": k.instance_id,
                    "probability": None,
                    "peak_row": None,
                    "peak_column": None,
                    "peak_value": None,
                    "peak_area": None,
                    "skip_reason": k.reason[:1000],
                }
                for k in analysis.skipped
            ]
            if rows:
                conn.execute(image_results.insert(), rows)
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job.job_id)
                .values(state=JobState.DONE.value, finished_at=now, lease_owner=None)
            )
            # A study re-opened meanwhile (newer revision) stays RECEIVED/QUEUED for its new job.
            conn.execute(
                update(studies)
                .where(
                    studies.c.id == job.study_id,
                    studies.c.revision == job.study_revision,
                    studies.c.state == StudyState.QUEUED.value,
                )
                .values(
                    state=StudyState.INFERRED.value,
                    outcome=analysis.outcome.value,
                    inferred_at=now,
                )
            )
            self._raise_priority(conn, job.study_id, analysis, now)
        return True

    @staticmethod
    def _raise_priority(conn: Any, study_id: int, analysis: StudyAnalysis, now: datetime) -> None:
        """Priority only goes up: keep the highest score and operating point; flag once."""
        score = analysis.score
        if score is None:
            return
        values: dict[str, Any] = {
            "score": case(
                (or_(studies.c.score.is_(None), studies.c.score < score), score),
                else_=studies.c.score,
            ),
            "model_version": analysis.model_version[:32],
        }
        point = analysis.operating_point
        if point is not None:
            weaker = list(OPERATING_POINT_ORDER[: OPERATING_POINT_ORDER.index(point)])
            values["operating_point"] = case(
                (
                    or_(
                        studies.c.operating_point.is_(None),
                        studies.c.operating_point.in_(weaker),
                    ),
                    point,
                ),
                else_=studies.c.operating_point,
            )
        if analysis.outcome == Outcome.POSITIVE:
            values["flagged_at"] = func.coalesce(studies.c.flagged_at, now)
        conn.execute(update(studies).where(studies.c.id == study_id).values(**values))

    def retry_or_fail(
        self,
        job: ClaimedJob,
        owner: str,
        error: str,
        now: datetime,
        *,
        max_attempts: int,
        retry_at: datetime,
    ) -> JobState:
        """After a failed attempt: back to the queue at *retry_at*, or FAILED at the last one."""
        with self.engine.begin() as conn:
            if not self._owns(conn, job, owner):
                return JobState.RUNNING
            if job.attempts >= max_attempts:
                self._finish_failed(conn, job.job_id, error, now)
                return JobState.FAILED
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job.job_id)
                .values(
                    state=JobState.QUEUED.value,
                    run_after=retry_at,
                    lease_owner=None,
                    last_error=error[:4000],
                )
            )
        return JobState.QUEUED

    def release(self, job: ClaimedJob, owner: str, reason: str, retry_at: datetime) -> None:
        """Give a job back without counting the attempt (this worker cannot do it)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job.job_id, jobs.c.lease_owner == owner)
                .values(
                    state=JobState.QUEUED.value,
                    run_after=retry_at,
                    lease_owner=None,
                    attempts=jobs.c.attempts - 1,
                    last_error=reason[:4000],
                )
            )

    @staticmethod
    def _finish_failed(conn: Any, job_id: int, error: str, now: datetime) -> None:
        conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id)
            .values(
                state=JobState.FAILED.value,
                finished_at=now,
                lease_owner=None,
                last_error=error[:4000],
            )
        )
        study = conn.execute(
            select(jobs.c.study_id, jobs.c.study_revision).where(jobs.c.id == job_id)
        ).one()
        conn.execute(
            update(studies)
            .where(
                studies.c.id == study.study_id,
                studies.c.revision == study.study_revision,
                studies.c.state == StudyState.QUEUED.value,
            )
            .values(state=StudyState.INFERRED.value, outcome=Outcome.FAILED.value, inferred_at=now)
        )

    # -- service heartbeat -------------------------------------------------------------------

    def _heartbeat(self, table: Table, values: dict[str, Any], now: datetime) -> None:
        """Insert or refresh this process's row (keyed by ``host:pid``) in *table*."""
        values = {**values, "heartbeat_at": now, "stopped_at": None}
        with self.engine.begin() as conn:
            stmt = self._dialect_insert(table).values(
                owner=process_owner(), **{"started_at": now, **values}
            )
            conn.execute(stmt.on_conflict_do_update(index_elements=[table.c.owner], set_=values))

    def _stopped(self, table: Table, now: datetime) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(table)
                .where(table.c.owner == process_owner())
                .values(stopped_at=now, heartbeat_at=now)
            )

    def service_heartbeat(
        self, version: str, ae_title: str, port: int, now: datetime, *, starting: bool = False
    ) -> None:
        values: dict[str, Any] = {"version": version, "ae_title": ae_title, "port": port}
        if starting:
            values["started_at"] = now
        self._heartbeat(services, values, now)

    def service_stopped(self, now: datetime) -> None:
        self._stopped(services, now)

    def worker_heartbeat(
        self, model: str, version: str, provider: str, jobs_done: int, now: datetime
    ) -> None:
        values = {
            "model_name": model[:64],
            "model_version": version[:32],
            "provider": provider[:64],
            "jobs_done": jobs_done,
        }
        self._heartbeat(workers, values, now)

    def worker_stopped(self, now: datetime) -> None:
        self._stopped(workers, now)

    def live_workers(self, since: datetime) -> list[WorkerRecord]:
        """Workers that sent a heartbeat after *since* and have not stopped."""
        query = (
            select(workers)
            .where(workers.c.heartbeat_at >= since, workers.c.stopped_at.is_(None))
            .order_by(workers.c.owner)
        )
        with self.engine.connect() as conn:
            return [
                WorkerRecord(
                    owner=r.owner,
                    model_name=r.model_name,
                    model_version=r.model_version,
                    provider=r.provider,
                    jobs_done=r.jobs_done,
                    heartbeat_at=r.heartbeat_at,
                )
                for r in conn.execute(query)
            ]

    def oldest_queued_job(self) -> datetime | None:
        with self.engine.connect() as conn:
            oldest: datetime | None = conn.execute(
                select(func.min(jobs.c.created_at)).where(jobs.c.state == JobState.QUEUED.value)
            ).scalar_one()
        return oldest

    def latest_service(self) -> ServiceRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(services).order_by(services.c.heartbeat_at.desc()).limit(1)
            ).one_or_none()
        if row is None:
            return None
        return ServiceRecord(
            owner=row.owner,
            version=row.version,
            ae_title=row.ae_title,
            port=row.port,
            started_at=row.started_at,
            heartbeat_at=row.heartbeat_at,
            stopped_at=row.stopped_at,
        )

    # -- outbox: result objects on their way to the PACS ----------------------------------------
    # One process delivers (the service's scheduler), so rows are not claimed, only updated.

    def add_outbox(
        self,
        study_id: int,
        result_version: int,
        files: Sequence[ResultFile],
        destinations: Sequence[str],
        now: datetime,
    ) -> None:
        """One PENDING row per file and destination; an object already there is left as it is
        (same UID = same object: a resend replaces nothing and duplicates nothing)."""
        rows = [
            {
                "study_id": study_id,
                "result_version": result_version,
                "kind": f.kind,
                "sop_class_uid": f.sop_class_uid,
                "sop_instance_uid": f.sop_instance_uid,
                "path": str(f.path),
                "destination": destination,
                "state": OutboxState.PENDING.value,
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
            }
            for f in files
            for destination in destinations
        ]
        if not rows:
            return
        statement = self._dialect_insert(outbox).on_conflict_do_nothing(
            index_elements=[outbox.c.destination, outbox.c.sop_instance_uid]
        )
        with self.engine.begin() as conn:
            conn.execute(statement, rows)

    def _outbox_query(self) -> Any:
        return select(outbox, studies.c.study_uid).join(studies, studies.c.id == outbox.c.study_id)

    @staticmethod
    def _outbox_item(row: Any) -> OutboxItem:
        return OutboxItem(
            id=row.id,
            study_uid=row.study_uid,
            result_version=row.result_version,
            kind=row.kind,
            sop_instance_uid=row.sop_instance_uid,
            path=Path(row.path),
            destination=row.destination,
            state=OutboxState(row.state),
            attempts=row.attempts,
            next_attempt_at=row.next_attempt_at,
            last_status=row.last_status,
            last_error=row.last_error,
            sent_at=row.sent_at,
        )

    def previous_report(self, study_id: int, before_version: int) -> Path | None:
        """The file of the latest SR made for an earlier revision of the study, if any."""
        query = (
            select(outbox.c.path)
            .where(
                outbox.c.study_id == study_id,
                outbox.c.kind == "sr",
                outbox.c.result_version < before_version,
            )
            .order_by(outbox.c.result_version.desc(), outbox.c.id.desc())
            .limit(1)
        )
        with self.engine.connect() as conn:
            path = conn.execute(query).scalar()
        return None if path is None else Path(path)

    def due_outbox(self, now: datetime, limit: int = 100) -> list[OutboxItem]:
        """PENDING items whose time has come, oldest first (results of a study stay together)."""
        query = (
            self._outbox_query()
            .where(outbox.c.state == OutboxState.PENDING.value, outbox.c.next_attempt_at <= now)
            .order_by(outbox.c.id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [self._outbox_item(row) for row in conn.execute(query)]

    def outbox_items(self, state: OutboxState | None = None, limit: int = 500) -> list[OutboxItem]:
        query = self._outbox_query().order_by(outbox.c.id.desc()).limit(limit)
        if state is not None:
            query = query.where(outbox.c.state == state.value)
        with self.engine.connect() as conn:
            return [self._outbox_item(row) for row in conn.execute(query)]

    def outbox_sent(self, item_id: int, status: int, now: datetime) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(outbox)
                .where(outbox.c.id == item_id)
                .values(
                    state=OutboxState.SENT.value,
                    attempts=outbox.c.attempts + 1,
                    last_status=status,
                    last_error=None,
                    sent_at=now,
                )
            )

    def outbox_failed(
        self,
        item_id: int,
        status: int | None,
        error: str,
        *,
        retry_at: datetime,
        max_attempts: int,
    ) -> OutboxState:
        """Count a failed attempt: PENDING again at *retry_at*, or DEAD at the last one."""
        dead = OutboxState.DEAD.value
        with self.engine.begin() as conn:
            conn.execute(
                update(outbox)
                .where(outbox.c.id == item_id)
                .values(
                    attempts=outbox.c.attempts + 1,
                    last_status=status,
                    last_error=error[:4000],
                    next_attempt_at=retry_at,
                    state=case(
                        (outbox.c.attempts + 1 >= max_attempts, dead),
                        else_=OutboxState.PENDING.value,
                    ),
                )
            )
            state = conn.execute(select(outbox.c.state).where(outbox.c.id == item_id)).scalar_one()
        return OutboxState(state)

    def outbox_retry(self, now: datetime, ids: Sequence[int] | None = None) -> int:
        """DEAD items (all, or those of *ids*) back to PENDING with a fresh attempt count."""
        condition = outbox.c.state == OutboxState.DEAD.value
        if ids is not None:
            condition = and_(condition, outbox.c.id.in_(list(ids)))
        with self.engine.begin() as conn:
            result = conn.execute(
                update(outbox)
                .where(condition)
                .values(state=OutboxState.PENDING.value, attempts=0, next_attempt_at=now)
            )
            return int(result.rowcount or 0)

    def outbox_counts(self) -> dict[str, dict[str, int]]:
        """destination -> state -> number of items."""
        query = select(outbox.c.destination, outbox.c.state, func.count()).group_by(
            outbox.c.destination, outbox.c.state
        )
        counts: dict[str, dict[str, int]] = {}
        with self.engine.connect() as conn:
            for destination, state, number in conn.execute(query):
                counts.setdefault(destination, {})[state] = int(number)
        return counts

    # -- priority table ----------------------------------------------------------------------

    _PRIORITY_STATE = case(
        (studies.c.reported_at.is_not(None), PriorityState.REPORTED.value),
        (studies.c.flagged_at.is_not(None), PriorityState.FLAGGED.value),
        else_=studies.c.state,
    )
    _UNREPORTED_POSITIVE = and_(studies.c.flagged_at.is_not(None), studies.c.reported_at.is_(None))
    # Rank: higher score first, then the older study (architecture.md, priority table).
    _RANK_ORDER = (studies.c.score.desc(), studies.c.first_received_at, studies.c.id)

    @classmethod
    def _priority_row(cls, row: Any, rank: int | None = None) -> PriorityRow:
        return PriorityRow(
            study_uid=row.study_uid,
            state=PriorityState(row.priority_state),
            outcome=None if row.outcome is None else Outcome(row.outcome),
            score=row.score,
            operating_point=row.operating_point,
            model_version=row.model_version,
            study_date=row.study_date,
            received_at=row.first_received_at,
            inferred_at=row.inferred_at,
            flagged_at=row.flagged_at,
            reported_at=row.reported_at,
            report_source=None if row.report_source is None else ReportSource(row.report_source),
            escalations=row.escalations,
            escalated_at=row.escalated_at,
            rank=rank,
        )

    def _priority_query(self) -> Any:
        return select(studies, self._PRIORITY_STATE.label("priority_state"))

    def worklist(self, limit: int = 1000) -> list[PriorityRow]:
        """Unreported positives, ranked: the order a radiologist should read them in."""
        query = (
            self._priority_query()
            .where(self._UNREPORTED_POSITIVE)
            .order_by(*self._RANK_ORDER)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [self._priority_row(r, n) for n, r in enumerate(conn.execute(query), 1)]

    def priority(self, study_uid: str) -> PriorityRow | None:
        """One study's priority row (with its rank when it is an unreported positive)."""
        ranked = (
            select(
                studies.c.id,
                func.row_number().over(order_by=self._RANK_ORDER).label("rank"),
            )
            .where(self._UNREPORTED_POSITIVE)
            .subquery()
        )
        query = (
            self._priority_query()
            .add_columns(ranked.c.rank)
            .outerjoin(ranked, ranked.c.id == studies.c.id)
            .where(studies.c.study_uid == study_uid)
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).one_or_none()
            if row is None:
                return None
            found = self._priority_row(row, row.rank)
            if found.outcome == Outcome.SKIPPED:
                found = replace(found, skip_reason=self._skip_reason(conn, row.id))
        return found

    @staticmethod
    def _skip_reason(conn: Connection, study_id: int) -> str | None:
        """Why the study's latest analysis analysed nothing: its images' most common reason."""
        latest = (
            select(func.max(study_results.c.id))
            .where(study_results.c.study_id == study_id)
            .scalar_subquery()
        )
        reasons = conn.execute(
            select(image_results.c.skip_reason, func.count().label("n"))
            .where(image_results.c.study_result_id == latest)
            .where(image_results.c.skip_reason.is_not(None))
            .group_by(image_results.c.skip_reason)
            .order_by(func.count().desc(), image_results.c.skip_reason)
            .limit(1)
        ).first()
        return None if reasons is None else str(reasons.skip_reason)

    def oldest_unreported_flag(self) -> datetime | None:
        """When the longest-waiting unreported positive was flagged."""
        with self.engine.connect() as conn:
            oldest: datetime | None = conn.execute(
                select(func.min(studies.c.flagged_at)).where(self._UNREPORTED_POSITIVE)
            ).scalar_one()
        return oldest

    def priority_counts(self) -> dict[str, int]:
        """Studies by priority state."""
        query = select(self._PRIORITY_STATE, func.count()).group_by(self._PRIORITY_STATE)
        with self.engine.connect() as conn:
            return {str(state): int(n) for state, n in conn.execute(query)}

    def mark_reported(
        self,
        source: ReportSource,
        now: datetime,
        *,
        study_uid: str | None = None,
        accession_number: str | None = None,
    ) -> list[tuple[str, bool]]:
        """Record that a study (by UID, or every study of an accession number) was reported.

        Returns (study UID, newly reported) for each study found; an empty list when none was.
        """
        if (study_uid is None) == (accession_number is None):
            raise ValueError("give exactly one of study_uid and accession_number")
        match = (
            studies.c.study_uid == study_uid
            if study_uid is not None
            else studies.c.accession_number == (accession_number or "")[:16]
        )
        with self.engine.begin() as conn:
            found = conn.execute(
                select(studies.c.id, studies.c.study_uid, studies.c.reported_at).where(match)
            ).all()
            fresh = [r.id for r in found if r.reported_at is None]
            if fresh:
                conn.execute(
                    update(studies)
                    .where(studies.c.id.in_(fresh), studies.c.reported_at.is_(None))
                    .values(reported_at=now, report_source=source.value)
                )
        return [(r.study_uid, r.reported_at is None) for r in found]

    def studies_to_check(
        self, now: datetime, every: timedelta, limit: int
    ) -> list[tuple[int, str]]:
        """Unreported positives not looked up in the PACS for *every*; least recently first."""
        query = (
            select(studies.c.id, studies.c.study_uid)
            .where(
                self._UNREPORTED_POSITIVE,
                or_(studies.c.checked_at.is_(None), studies.c.checked_at <= now - every),
            )
            .order_by(studies.c.checked_at.is_not(None), studies.c.checked_at, studies.c.id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [(int(r.id), str(r.study_uid)) for r in conn.execute(query)]

    def checked(self, study_id: int, now: datetime) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(studies).where(studies.c.id == study_id).values(checked_at=now))

    def own_objects(self, study_id: int) -> set[str]:
        """SOP Instance UIDs of every result object the node made for the study."""
        query = select(outbox.c.sop_instance_uid).where(outbox.c.study_id == study_id).distinct()
        with self.engine.connect() as conn:
            return set(conn.execute(query).scalars())

    def due_escalations(
        self, now: datetime, after: timedelta, repeat: timedelta, limit: int = 100
    ) -> list[EscalationDue]:
        """Unreported positives flagged longer than *after* and not escalated within *repeat*."""
        query = (
            select(
                studies.c.id,
                studies.c.study_uid,
                studies.c.accession_number,
                studies.c.escalations,
                studies.c.escalated_at,
            )
            .where(
                self._UNREPORTED_POSITIVE,
                studies.c.flagged_at <= now - after,
                or_(studies.c.escalated_at.is_(None), studies.c.escalated_at <= now - repeat),
            )
            .order_by(*self._RANK_ORDER)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [
                EscalationDue(
                    study_id=r.id,
                    study_uid=r.study_uid,
                    accession_number=r.accession_number,
                    escalations=r.escalations,
                    escalated_at=r.escalated_at,
                )
                for r in conn.execute(query)
            ]

    def escalate(self, due: EscalationDue, now: datetime) -> int | None:
        """Count one escalation and put the study's latest KOS back in the outbox.

        Returns how many outbox items were re-queued, or None when the study changed meanwhile
        (reported, or escalated by another process).
        """
        with self.engine.begin() as conn:
            counted = conn.execute(
                update(studies)
                .where(
                    studies.c.id == due.study_id,
                    studies.c.reported_at.is_(None),
                    studies.c.escalations == due.escalations,
                )
                .values(escalations=studies.c.escalations + 1, escalated_at=now)
            )
            if counted.rowcount != 1:
                return None
            latest = (
                select(func.max(outbox.c.result_version))
                .where(outbox.c.study_id == due.study_id, outbox.c.kind == "ko")
                .scalar_subquery()
            )
            resent = conn.execute(
                update(outbox)
                .where(
                    outbox.c.study_id == due.study_id,
                    outbox.c.kind == "ko",
                    outbox.c.result_version == latest,
                )
                .values(state=OutboxState.PENDING.value, attempts=0, next_attempt_at=now)
            )
        return int(resent.rowcount or 0)

    # -- status ------------------------------------------------------------------------------

    def totals(self) -> Totals:
        with self.engine.connect() as conn:
            by_state: dict[str, int] = dict(
                conn.execute(select(studies.c.state, func.count()).group_by(studies.c.state)).all()
            )
            job_states: dict[str, int] = dict(
                conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)).all()
            )
            count, size, last = conn.execute(
                select(
                    func.count(instances.c.id),
                    func.coalesce(
                        func.sum(case((instances.c.purged_at.is_(None), instances.c.size_bytes))),
                        0,
                    ),
                    func.max(instances.c.received_at),
                )
            ).one()
            open_assocs = conn.execute(
                select(func.count()).where(associations.c.ended_at.is_(None))
            ).scalar_one()
        return Totals(
            studies_by_state={str(k): int(v) for k, v in by_state.items()},
            jobs_by_state={str(k): int(v) for k, v in job_states.items()},
            instances=int(count),
            spool_bytes=int(size),
            last_received_at=last,
            open_associations=int(open_assocs),
        )

    # -- retention ---------------------------------------------------------------------------

    @staticmethod
    def _unreported_positive() -> Any:
        return and_(studies.c.flagged_at.is_not(None), studies.c.reported_at.is_(None))

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
                not_(self._unreported_positive()),
                not_(undelivered),
            )
            .order_by(studies.c.inferred_at, studies.c.id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
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
        with self.engine.begin() as conn:
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
                not_(self._unreported_positive()),
            )
            .order_by(studies.c.id)
            .limit(limit)
        )
        with self.engine.begin() as conn:
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

    def record_retention_run(
        self, now: datetime, counts: RetentionCounts, *, keep_runs_after: datetime
    ) -> None:
        """Keep the figures of one retention run (and forget runs older than the rows)."""
        with self.engine.begin() as conn:
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

    def retention_summary(self) -> RetentionSummary:
        with self.engine.connect() as conn:
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

    def ping(self) -> None:
        """Raise SQLAlchemyError when the database cannot be reached."""
        with self.engine.connect() as conn:
            conn.execute(select(1))
