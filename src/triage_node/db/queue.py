"""The job queue: a settled study becomes a job; workers claim jobs with a lease and complete,
retry or release them.

PostgreSQL claims with ``FOR UPDATE SKIP LOCKED``; SQLite's write transaction (BEGIN IMMEDIATE)
makes a claim atomic. Completing a job raises the study's priority through
:func:`triage_node.db.priority.raise_priority`, in the same transaction.
"""

from __future__ import annotations

import enum
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    and_,
    case,
    func,
    select,
    update,
)

from triage_node.db.engine import Aggregate
from triage_node.db.intake import ReadyStudy, StudyState
from triage_node.db.outbox import Outbox
from triage_node.db.priority import raise_priority
from triage_node.db.schema import (
    fit,
    image_results,
    instances,
    jobs,
    studies,
    study_results,
)
from triage_node.domain import OperatingPointName, Outcome, ResultFile, StudyAnalysis


class JobState(enum.StrEnum):
    """Life of one analysis job."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    SUPERSEDED = "SUPERSEDED"  # a newer job for the same study replaced it before it ran


@dataclass(frozen=True, slots=True)
class FailedJob:
    study_uid: str
    finished_at: datetime | None
    attempts: int
    error: str


@dataclass(frozen=True, slots=True)
class InstanceRef:
    """A stored instance of a study, as the worker sees it."""

    instance_id: int
    sop_instance_uid: str
    path: str  # relative to the spool


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """A job a worker holds the lease of."""

    job_id: int
    study_id: int
    study_uid: str
    study_revision: int
    attempts: int  # including this one


def _study_inferred(
    conn: Connection, study_id: int, revision: int, outcome: Outcome, now: datetime
) -> None:
    """The study's job is over: INFERRED with *outcome*. A study re-opened meanwhile (a newer
    revision) stays RECEIVED/QUEUED for its new job."""
    conn.execute(
        update(studies)
        .where(
            studies.c.id == study_id,
            studies.c.revision == revision,
            studies.c.state == StudyState.QUEUED.value,
        )
        .values(state=StudyState.INFERRED.value, outcome=outcome.value, inferred_at=now)
    )


class JobQueue(Aggregate):
    """Analysis jobs and their leases."""

    def enqueue(self, study: ReadyStudy, now: datetime) -> int | None:
        """Queue an analysis job for a settled study; None if it changed meanwhile.

        A job still waiting for the same study is superseded, so a re-opened study is analysed
        once, with all its instances.
        """
        with self._begin() as conn:
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

    def claim(self, owner: str, now: datetime, lease: timedelta) -> ClaimedJob | None:
        """Take the oldest runnable job with a lease; None when there is none.

        PostgreSQL: ``FOR UPDATE SKIP LOCKED``, so workers never wait for or share a job.
        SQLite: the write transaction (BEGIN IMMEDIATE) makes the claim atomic.
        """
        with self._begin() as conn:
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
        with self._begin() as conn:
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
        with self._begin() as conn:
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

    def recover_interrupted(self, is_alive: Callable[[int], bool], now: datetime) -> int:
        """At service start: jobs running in dead worker processes of this host go back to the
        queue at once, and the interrupted attempt is not counted (the service stopped, not the
        job; a job that kills its worker while the service runs still counts, by lease expiry)."""
        host = socket.gethostname()
        with self._begin() as conn:
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

    def instances_of(self, study_id: int) -> list[InstanceRef]:
        """A job's input: its study's stored instances in arrival order (selection reads each
        file's header)."""
        query = (
            select(instances.c.id, instances.c.sop_instance_uid, instances.c.path)
            .where(instances.c.study_id == study_id, instances.c.purged_at.is_(None))
            .order_by(instances.c.id)
        )
        with self._connect() as conn:
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

    def complete(
        self,
        job: ClaimedJob,
        owner: str,
        analysis: StudyAnalysis,
        now: datetime,
        *,
        results: Sequence[ResultFile] = (),
        destinations: Sequence[str] = (),
    ) -> bool:
        """Store the analysis, put its result files in the outbox for *destinations*, raise the
        study's priority and finish the job — one transaction, so results are never sent for an
        analysis the database does not hold; False (and nothing stored) if the lease was lost."""
        with self._begin() as conn:
            if not self._owns(conn, job, owner):
                return False
            Outbox.add_in(conn, job.study_id, job.study_revision, results, destinations, now)
            # The high-sensitivity threshold decides the outcome; reaching the high-specificity
            # point means the score passed both (StudyAnalysis.outcome / .operating_point).
            point = analysis.operating_point
            result_id = conn.execute(
                study_results.insert()
                .values(
                    job_id=job.job_id,
                    study_id=job.study_id,
                    study_revision=job.study_revision,
                    outcome=analysis.outcome.value,
                    score=analysis.score,
                    operating_point=None if point is None else point.value,
                    positive_high_sensitivity=analysis.outcome == Outcome.POSITIVE,
                    positive_high_specificity=point == OperatingPointName.HIGH_SPECIFICITY,
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
                    "skip_reason": fit(image_results, "skip_reason", k.reason),
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
            _study_inferred(conn, job.study_id, job.study_revision, analysis.outcome, now)
            raise_priority(conn, job.study_id, analysis, now)
        return True

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
        with self._begin() as conn:
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
                    last_error=fit(jobs, "last_error", error),
                )
            )
        return JobState.QUEUED

    def release(self, job: ClaimedJob, owner: str, reason: str, retry_at: datetime) -> None:
        """Give a job back without counting the attempt (this worker cannot do it)."""
        with self._begin() as conn:
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job.job_id, jobs.c.lease_owner == owner)
                .values(
                    state=JobState.QUEUED.value,
                    run_after=retry_at,
                    lease_owner=None,
                    attempts=jobs.c.attempts - 1,
                    last_error=fit(jobs, "last_error", reason),
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
                last_error=fit(jobs, "last_error", error),
            )
        )
        study = conn.execute(
            select(jobs.c.study_id, jobs.c.study_revision).where(jobs.c.id == job_id)
        ).one()
        _study_inferred(conn, study.study_id, study.study_revision, Outcome.FAILED, now)

    def oldest_queued(self) -> datetime | None:
        with self._connect() as conn:
            oldest: datetime | None = conn.execute(
                select(func.min(jobs.c.created_at)).where(jobs.c.state == JobState.QUEUED.value)
            ).scalar_one()
        return oldest

    def recent_failures(self, limit: int = 20) -> list[FailedJob]:
        """Analyses that gave up, newest first (the dashboard's "recent failures")."""
        query = (
            select(
                studies.c.study_uid,
                jobs.c.finished_at,
                jobs.c.attempts,
                jobs.c.last_error,
            )
            .join(studies, studies.c.id == jobs.c.study_id)
            .where(jobs.c.state == JobState.FAILED.value)
            .order_by(jobs.c.finished_at.desc(), jobs.c.id.desc())
            .limit(limit)
        )
        with self._connect() as conn:
            return [
                FailedJob(r.study_uid, r.finished_at, r.attempts, r.last_error or "")
                for r in conn.execute(query)
            ]
