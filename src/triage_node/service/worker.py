"""Analysis workers: claim a job with a lease, analyse its study, store the results.

Several workers, in several processes or on several hosts sharing one PostgreSQL database,
never process the same job (``JobQueue.claim``). A worker that dies loses its lease and the job is
claimed again; a job that keeps failing ends FAILED with its error kept. Workers on another host
read the spool through a shared mount; a worker that cannot read a study's files gives the job
back (without counting an attempt) for a worker that can.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import cast

import numpy as np

from triage_node.analysis.pipeline import ImageSource, analyse, read_dataset
from triage_node.analysis.runtime import ModelSession
from triage_node.analysis.scope import UnlabelledPolicy
from triage_node.config import WorkerConfig
from triage_node.db.engine import process_owner
from triage_node.db.outbox import Outbox
from triage_node.db.processes import Processes
from triage_node.db.queue import ClaimedJob, JobQueue, JobState
from triage_node.domain import ResultFile, StudyAnalysis, utcnow
from triage_node.errors import TriageError
from triage_node.logs import RepeatedFailure, get_logger, log_event
from triage_node.results.spooled import content_key, read_predecessor, result_objects, write_results
from triage_node.service.backoff import exponential_backoff
from triage_node.service.doorbell import Doorbell
from triage_node.spool import Spool

LOG = get_logger(__name__)
MISSING_FILE_RETRY_SECONDS = 30.0
HEARTBEAT_SECONDS = 5.0
STOP_CHECK_SECONDS = 0.5  # an idle worker waiting for its doorbell notices SIGTERM this soon


class Worker:
    """One worker: a model, the queue it takes jobs from, the outbox it fills, and a spool."""

    def __init__(
        self,
        queue: JobQueue,
        outbox: Outbox,
        processes: Processes,
        spool: Spool,
        model: ModelSession,
        config: WorkerConfig,
        *,
        destinations: Sequence[str] = (),
        name: str | None = None,
        clock: Callable[[], datetime] = utcnow,
        on_results: Callable[[], None] | None = None,
    ) -> None:
        self.queue = queue
        self.outbox = outbox
        self.processes = processes
        self.spool = spool
        self.model = model
        self.config = config
        self.destinations = list(destinations)
        self.owner = name or process_owner()
        self.clock = clock
        self.lease = timedelta(seconds=config.lease_seconds)
        self.jobs_done = 0
        self.on_results = on_results  # results are in the outbox: deliver them now

    def run_once(self) -> bool:
        """Claim and process one job; False when the queue had nothing runnable."""
        job = self.queue.claim(self.owner, self.clock(), self.lease)
        if job is None:
            return False
        refs = self.queue.instances_of(job.study_id)
        sources = []
        for ref in refs:
            path = self.spool.path_of(ref.path)
            if not path.is_file():
                reason = f"cannot read spooled file of {ref.sop_instance_uid} on this host"
                self.queue.release(
                    job,
                    self.owner,
                    reason,
                    self.clock() + timedelta(seconds=MISSING_FILE_RETRY_SECONDS),
                )
                log_event(
                    LOG,
                    logging.WARNING,
                    "job_released",
                    reason,
                    job=job.job_id,
                    study_uid=job.study_uid,
                    worker=self.owner,
                )
                return True
            sources.append(ImageSource(ref.instance_id, ref.sop_instance_uid, path))
        started = time.perf_counter()
        pictures: dict[str, np.ndarray] = {}
        try:
            with self._keep_lease(job):
                analysis = analyse(
                    sources,
                    self.model,
                    self.config.max_batch,
                    pictures,
                    unlabelled=cast(UnlabelledPolicy, self.config.unlabelled_images),
                )
                results = self._results(job, analysis, sources, pictures)
        except Exception as exc:
            self._failed(job, f"{type(exc).__name__}: {exc}")
            return True
        # The result files are durable in the spool; their outbox rows go in with the job's
        # completion, in one transaction. A crash before it re-runs the job, which writes the
        # same objects (same UIDs) again.
        done = self.queue.complete(
            job,
            self.owner,
            analysis,
            self.clock(),
            results=results,
            destinations=self.destinations,
        )
        if not done:
            log_event(
                LOG,
                logging.WARNING,
                "lease_lost",
                "lease lost; results dropped",
                job=job.job_id,
                study_uid=job.study_uid,
                worker=self.owner,
            )
            return True
        self.jobs_done += 1
        if self.on_results is not None and results:
            self.on_results()
        log_event(
            LOG,
            logging.INFO,
            "study_inferred",
            "study analysed",
            job=job.job_id,
            study_uid=job.study_uid,
            outcome=analysis.outcome.value,
            score=None if analysis.score is None else round(analysis.score, 4),
            images=len(analysis.images),
            skipped=len(analysis.skipped),
            model=analysis.model_name,
            version=analysis.model_version,
            provider=analysis.provider,
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return True

    def _results(
        self,
        job: ClaimedJob,
        analysis: StudyAnalysis,
        sources: list[ImageSource],
        pictures: dict[str, np.ndarray],
    ) -> list[ResultFile]:
        """Build and durably write the SR, heatmaps and KOS of an analysed study."""
        if not analysis.images:
            return []
        analysed = {i.sop_instance_uid for i in analysis.images}
        headers = {
            s.sop_instance_uid: read_dataset(s.path, pixels=False)
            for s in sources
            if s.sop_instance_uid in analysed
        }
        predecessor = read_predecessor(self.outbox.previous_sr(job.study_id, job.study_revision))
        with warnings.catch_warnings():  # highdicom/pydicom warnings can quote element values
            warnings.simplefilter("ignore")
            # Keyed on the analysed images only: the node's own objects coming back inside a
            # resent study, or images the model is not for, do not make a new result.
            version = content_key(i.sop_instance_uid for i in analysis.images)
            objects = result_objects(
                job.study_uid, version, analysis, headers, pictures, predecessor
            )
        return write_results(self.spool, job.study_uid, objects)

    def _failed(self, job: ClaimedJob, error: str) -> None:
        state = self.queue.retry_or_fail(
            job,
            self.owner,
            error,
            self.clock(),
            max_attempts=self.config.max_attempts,
            retry_at=self.clock()
            + exponential_backoff(self.config.retry_backoff_seconds, job.attempts),
        )
        log_event(
            LOG,
            logging.ERROR if state == JobState.FAILED else logging.WARNING,
            "job_failed" if state == JobState.FAILED else "job_retry",
            f"analysis failed: {error[:200]}",
            job=job.job_id,
            study_uid=job.study_uid,
            attempt=job.attempts,
            next=state.value,
            worker=self.owner,
        )

    @contextlib.contextmanager
    def _keep_lease(self, job: ClaimedJob) -> Iterator[None]:
        """Extend the lease every third of its length while the job runs."""
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.config.lease_seconds / 3):
                self.queue.extend_lease(job.job_id, self.owner, self.clock() + self.lease)

        thread = threading.Thread(target=renew, name=f"lease-{job.job_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def requeue_expired(self) -> None:
        requeued, failed = self.queue.requeue_expired(self.clock(), self.config.max_attempts)
        if requeued or failed:
            log_event(
                LOG,
                logging.WARNING,
                "leases_expired",
                "jobs of lost workers taken back",
                requeued=requeued,
                failed=failed,
                worker=self.owner,
            )

    def heartbeat(self) -> None:
        m = self.model.manifest
        self.processes.worker_heartbeat(
            m.name, m.version, self.model.provider, self.jobs_done, self.clock()
        )

    def run_forever(self, stop: threading.Event, doorbell: Doorbell | None = None) -> None:
        """Work until *stop* is set; the job in hand is finished first. Idle, wait for the
        *doorbell* (a study was queued) or, at the latest, ``worker.poll_seconds``."""
        next_sweep = next_beat = 0.0
        failures = RepeatedFailure(LOG, "worker_error")  # e.g. the database away: every tick
        while not stop.is_set():
            if time.monotonic() >= next_beat:  # status shows live workers and their provider
                with contextlib.suppress(Exception):
                    self.heartbeat()
                next_beat = time.monotonic() + HEARTBEAT_SECONDS
            if time.monotonic() >= next_sweep:  # every worker also looks for dead workers' jobs
                with contextlib.suppress(Exception):
                    self.requeue_expired()
                next_sweep = time.monotonic() + self.config.lease_seconds / 2
            try:
                busy = self.run_once()
            except TriageError as exc:
                failures.failed(logging.ERROR, str(exc), worker=self.owner)
                busy = False
            except Exception as exc:
                failures.failed(
                    logging.WARNING, f"{type(exc).__name__}: {exc}"[:300], worker=self.owner
                )
                busy = False
            else:
                failures.succeeded()
            if not busy:
                self._idle(stop, doorbell)
        with contextlib.suppress(Exception):
            self.processes.worker_stopped(self.clock())

    def _idle(self, stop: threading.Event, doorbell: Doorbell | None) -> None:
        if doorbell is None:
            stop.wait(self.config.poll_seconds)
            return
        until = time.monotonic() + self.config.poll_seconds
        while not stop.is_set() and (left := until - time.monotonic()) > 0:
            if doorbell.wait(min(left, STOP_CHECK_SECONDS)):
                return
