"""The job queue on SQLite and PostgreSQL: exclusive claims, leases, retries, results."""

from __future__ import annotations

import socket
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.support.records import header
from triage_node.db.database import Database
from triage_node.db.queue import JobState
from triage_node.db.schema import image_results, jobs, studies, study_results
from triage_node.domain import ImageResult, ResultFile, ResultKind, Skip, SpooledFile, StudyAnalysis

T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
LEASE = timedelta(seconds=60)


def queue_studies(store: Database, count: int) -> None:
    for n in range(count):
        h = header(study=f"1.2.{n}", sop=f"1.2.{n}.1.1", modality="DX")
        store.intake.record_instance(h, SpooledFile(f"{n}.dcm", 10, False), None, T0)
    for ready in store.intake.ready_studies(
        T0 + timedelta(seconds=10), timedelta(0), timedelta(hours=1)
    ):
        assert store.queue.enqueue(ready, T0 + timedelta(seconds=10)) is not None


def analysis(instance_id: int, probability: float) -> StudyAnalysis:
    return StudyAnalysis(
        images=(ImageResult(instance_id, "1.2.0.1.1", probability, 10, 20, 1.0, 0.05, 12.0),),
        skipped=(Skip(instance_id, "1.2.0.1.1", "example skip"),),
        model_name="tiny",
        model_version="1",
        provider="CPUExecutionProvider",
        threshold_high_sensitivity=0.3,
        threshold_high_specificity=0.7,
        inference_ms=5.0,
    )


def test_two_workers_never_share_a_job(store: Database) -> None:
    queue_studies(store, 30)
    claimed: dict[str, list[int]] = {"a": [], "b": []}
    now = T0 + timedelta(minutes=1)

    def work(name: str) -> None:
        while (job := store.queue.claim(name, now, LEASE)) is not None:
            claimed[name].append(job.job_id)

    threads = [threading.Thread(target=work, args=(n,)) for n in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    together = claimed["a"] + claimed["b"]
    assert len(together) == 30 and len(set(together)) == 30


def test_expired_lease_is_claimed_again_then_failed(store: Database) -> None:
    queue_studies(store, 1)
    now = T0 + timedelta(minutes=1)
    first = store.queue.claim("dead-worker", now, LEASE)
    assert first is not None and first.attempts == 1
    assert store.queue.claim("other", now, LEASE) is None  # leased
    assert store.queue.requeue_expired(now + LEASE / 2, max_attempts=2) == (0, 0)
    assert store.queue.requeue_expired(now + LEASE * 2, max_attempts=2) == (1, 0)
    second = store.queue.claim("other", now + LEASE * 2, LEASE)
    assert second is not None and second.job_id == first.job_id and second.attempts == 2
    assert store.queue.requeue_expired(now + LEASE * 4, max_attempts=2) == (0, 1)
    with store.engine.connect() as conn:
        state, error = conn.execute(select(jobs.c.state, jobs.c.last_error)).one()
        study_state, outcome = conn.execute(select(studies.c.state, studies.c.outcome)).one()
    assert state == JobState.FAILED.value and "lease expired" in error
    assert (study_state, outcome) == ("INFERRED", "failed")


def test_jobs_interrupted_by_a_stopped_service_go_back_uncounted(store: Database) -> None:
    queue_studies(store, 3)
    now = T0 + timedelta(minutes=1)
    host = socket.gethostname()
    dead, alive, elsewhere = f"{host}:1001", f"{host}:1002", "other-host:1001"
    for owner in (dead, alive, elsewhere):
        assert store.queue.claim(owner, now, LEASE) is not None
    recovered = store.queue.recover_interrupted(lambda pid: pid == 1002, now)
    assert recovered == 1  # the live worker's and the other host's jobs are not touched
    again = store.queue.claim("new-worker", now, LEASE)
    assert again is not None and again.attempts == 1  # the interrupted attempt did not count
    with store.engine.connect() as conn:
        owners = set(conn.execute(select(jobs.c.lease_owner)).scalars())
    assert owners == {alive, elsewhere, "new-worker"}


def test_job_that_keeps_failing_ends_failed_with_its_error(store: Database) -> None:
    queue_studies(store, 1)
    now = T0 + timedelta(minutes=1)
    for attempt in (1, 2, 3):
        job = store.queue.claim("w", now, LEASE)
        assert job is not None and job.attempts == attempt
        state = store.queue.retry_or_fail(
            job, "w", f"boom {attempt}", now, max_attempts=3, retry_at=now
        )
        assert state == (JobState.FAILED if attempt == 3 else JobState.QUEUED)
    assert store.queue.claim("w", now, LEASE) is None
    with store.engine.connect() as conn:
        assert conn.execute(select(jobs.c.state, jobs.c.last_error)).one() == ("FAILED", "boom 3")
    [failure] = store.queue.recent_failures()  # what the dashboard lists
    assert failure.error == "boom 3" and failure.attempts == 3 and failure.finished_at == now


def test_retry_waits_for_its_backoff(store: Database) -> None:
    queue_studies(store, 1)
    now = T0 + timedelta(minutes=1)
    job = store.queue.claim("w", now, LEASE)
    assert job is not None
    store.queue.retry_or_fail(
        job, "w", "x", now, max_attempts=3, retry_at=now + timedelta(seconds=20)
    )
    assert store.queue.claim("w", now + timedelta(seconds=10), LEASE) is None
    assert store.queue.claim("w", now + timedelta(seconds=20), LEASE) is not None


def test_release_does_not_count_an_attempt(store: Database) -> None:
    queue_studies(store, 1)
    now = T0 + timedelta(minutes=1)
    job = store.queue.claim("w1", now, LEASE)
    assert job is not None
    store.queue.release(job, "w1", "cannot read the spool here", now)
    again = store.queue.claim("w2", now, LEASE)
    assert again is not None and again.attempts == 1


def test_complete_stores_results_and_marks_the_study(store: Database) -> None:
    queue_studies(store, 1)
    now = T0 + timedelta(minutes=1)
    job = store.queue.claim("w", now, LEASE)
    assert job is not None
    [ref] = store.queue.instances_of(job.study_id)
    assert store.queue.complete(job, "w", analysis(ref.instance_id, 0.8), now)
    assert not store.queue.complete(job, "w", analysis(ref.instance_id, 0.8), now)  # only once
    with store.engine.connect() as conn:
        result = conn.execute(select(study_results)).one()
        images = conn.execute(select(image_results)).all()
        study = conn.execute(select(studies.c.state, studies.c.outcome)).one()
    assert result.score == pytest.approx(0.8) and result.outcome == "positive"
    assert result.operating_point == "high_specificity"
    assert result.positive_high_sensitivity and result.positive_high_specificity
    assert len(images) == 2 and {i.skip_reason for i in images} == {None, "example skip"}
    assert tuple(study) == ("INFERRED", "positive")


def test_lost_lease_cannot_complete(store: Database) -> None:
    queue_studies(store, 1)
    now = T0 + timedelta(minutes=1)
    job = store.queue.claim("slow", now, LEASE)
    assert job is not None
    store.queue.requeue_expired(now + LEASE * 2, max_attempts=5)
    assert store.queue.claim("fast", now + LEASE * 2, LEASE) is not None
    assert not store.queue.extend_lease(job.job_id, "slow", now + LEASE * 3)
    assert not store.queue.complete(job, "slow", analysis(1, 0.1), now + LEASE * 2)


def test_results_reach_the_outbox_with_the_completion_only(store: Database) -> None:
    """The outbox rows and the job's completion are one transaction: a worker whose lease was
    taken over sends nothing, and nothing is sent for an analysis the database does not hold."""
    queue_studies(store, 1)
    now = T0 + timedelta(minutes=1)
    files = [ResultFile(ResultKind.SR, "1.2.840.10008.5.1.4.1.1.88.34", "2.25.7", Path("/r.dcm"))]
    stale = store.queue.claim("w1", now, LEASE)
    assert stale is not None
    [ref] = store.queue.instances_of(stale.study_id)
    assert store.queue.requeue_expired(now + 2 * LEASE, max_attempts=3) == (1, 0)
    fresh = store.queue.claim("w2", now + 2 * LEASE, LEASE)
    assert fresh is not None
    result = analysis(ref.instance_id, 0.8)
    assert not store.queue.complete(stale, "w1", result, now, results=files, destinations=["P"])
    assert store.outbox.items() == []
    assert store.queue.complete(fresh, "w2", result, now, results=files, destinations=["P"])
    assert [(i.kind, i.sop_instance_uid) for i in store.outbox.items()] == [
        (ResultKind.SR, "2.25.7")
    ]
