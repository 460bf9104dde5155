"""Periodic work of the service (APScheduler): settled studies become jobs, results are
delivered, report status is looked up in the PACS, unreported positives are escalated, data
past retention is removed, and a heartbeat is kept."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler

from triage_node import __version__
from triage_node.config import Config
from triage_node.db.database import Database
from triage_node.db.intake import Intake
from triage_node.db.notify import Notifier
from triage_node.db.queue import JobQueue
from triage_node.domain import utcnow
from triage_node.errors import DatabaseUnavailable
from triage_node.logs import RepeatedFailure, get_logger, log_event
from triage_node.service.delivery import OutboxDelivery
from triage_node.service.doorbell import JOBS, OUTBOX, STUDIES, Doorbell, run_dir
from triage_node.service.escalation import Escalator
from triage_node.service.reconciliation import PacsReconciler
from triage_node.service.relay import Announcer
from triage_node.service.retention import Retention
from triage_node.spool import Spool

LOG = get_logger(__name__)
SETTLE_MARGIN_SECONDS = 0.05  # past the settle time, so the study's last instance counts as settled
STOP_CHECK_SECONDS = 0.5


class StudyCompleteness:
    """Turns studies that have settled (architecture.md, "Study completeness") into jobs."""

    def __init__(
        self,
        intake: Intake,
        queue: JobQueue,
        config: Config,
        clock: Callable[[], datetime] = utcnow,
    ):
        self.intake = intake
        self.queue = queue
        self.settle = timedelta(seconds=config.study.settle_seconds)
        self.stale = timedelta(seconds=config.study.stale_association_seconds)
        self.clock = clock

    def promote_ready_studies(self) -> int:
        """Queue a job for every settled study; return how many were queued."""
        queued = 0
        now = self.clock()
        for study in self.intake.ready_studies(now, self.settle, self.stale):
            job_id = self.queue.enqueue(study, now)
            if job_id is None:
                continue  # an instance arrived meanwhile; it will settle again
            queued += 1
            log_event(
                LOG,
                logging.INFO,
                "study_queued",
                "study complete; analysis queued",
                study_uid=study.study_uid,
                revision=study.revision,
                job=job_id,
            )
        return queued


class ServiceScheduler:
    """The background scheduler of ``triage-node serve``."""

    def __init__(self, store: Database, config: Config) -> None:
        self.store = store
        self.config = config
        self._stopping = threading.Event()
        self._listeners: list[threading.Thread] = []
        self.completeness = StudyCompleteness(store.intake, store.queue, config)
        self._scheduler = BackgroundScheduler(
            timezone=UTC, job_defaults={"coalesce": True, "max_instances": 1}
        )
        self.doorbells = run_dir(config.storage.data_dir)
        self.announce = Announcer(self.doorbells, Notifier(store.engine))
        self._promote = self._guarded(self._promote_and_ring, "promote_failed")
        self._scheduler.add_job(
            self._promote,
            "interval",
            seconds=config.service.poll_seconds,  # the safety net: doorbells move work on
            id="promote-ready-studies",
        )
        self.delivery = OutboxDelivery(store.outbox, config.delivery, config.dicom.ae_title)
        self._scheduler.add_job(
            self._guarded(self.delivery.deliver_due, "delivery_failed"),
            "interval",
            seconds=config.delivery.interval_seconds,
            id="deliver-outbox",
        )
        self.reconciler = PacsReconciler(store.report_checks, store.priority, store.outbox, config)
        if config.reconcile.pacs:
            self._scheduler.add_job(
                self._guarded(self.reconciler.reconcile_once, "reconcile_failed"),
                "interval",
                seconds=config.reconcile.interval_seconds,
                id="reconcile-reports",
            )
        self.escalator = Escalator(store.escalations, config)
        if config.escalation.after_seconds > 0:
            self._scheduler.add_job(
                self._guarded(self.escalator.escalate_due, "escalation_failed"),
                "interval",
                seconds=config.escalation.interval_seconds,
                id="escalate",
            )
        self.retention = Retention(
            store.retention, Spool(config.storage.spool_path), config.retention
        )
        self._scheduler.add_job(
            self._guarded(self.retention.run_once, "retention_failed"),
            "interval",
            seconds=config.retention.interval_seconds,
            id="retention",
            next_run_time=datetime.now(UTC) + timedelta(seconds=5),  # soon after start, too
        )
        self._scheduler.add_job(
            self._guarded(self.heartbeat, "heartbeat_failed"),
            "interval",
            seconds=config.service.heartbeat_seconds,
            id="heartbeat",
        )

    def heartbeat(self, *, starting: bool = False) -> None:
        self.store.processes.service_heartbeat(
            __version__,
            self.config.dicom.ae_title,
            self.config.dicom.port,
            utcnow(),
            starting=starting,
        )

    @staticmethod
    def _guarded(job: Callable[[], object], action: str) -> Callable[[], None]:
        failures = RepeatedFailure(LOG, action)

        def run() -> None:
            try:
                job()
            except DatabaseUnavailable as exc:  # database away: try again next tick
                failures.failed(logging.WARNING, "database unavailable", error=str(exc)[:200])
            except OSError as exc:  # the spool's file system (retention): next tick too
                failures.failed(logging.ERROR, f"file system error: {exc.strerror or exc}")
            else:
                failures.succeeded()

        return run

    def _promote_and_ring(self) -> None:
        if self.completeness.promote_ready_studies():
            self.announce(JOBS)  # an idle worker, on this host or another, claims at once

    def study_may_be_complete(self) -> None:
        """An association ended: look for settled studies once its instances have settled."""
        settle = timedelta(seconds=self.config.study.settle_seconds + SETTLE_MARGIN_SECONDS)
        self._scheduler.add_job(self._promote, "date", run_date=datetime.now(UTC) + settle)

    def results_waiting(self) -> None:
        """A worker put results in the outbox: deliver now."""
        self._scheduler.modify_job("deliver-outbox", next_run_time=datetime.now(UTC))

    def _listen(self, topic: str, action: Callable[[], None]) -> None:
        try:
            doorbell = Doorbell(self.doorbells, topic)
        except OSError as exc:  # the sweeps still find the work, later
            log_event(LOG, logging.WARNING, "doorbell_failed", f"no {topic} doorbell: {exc}")
            return
        with doorbell:
            while not self._stopping.is_set():
                if doorbell.wait(STOP_CHECK_SECONDS) and not self._stopping.is_set():
                    with contextlib.suppress(Exception):  # the scheduler shutting down
                        action()

    def start(self) -> None:
        self.heartbeat(starting=True)
        self._scheduler.start()
        for topic, action in (
            (STUDIES, self.study_may_be_complete),
            (OUTBOX, self.results_waiting),
        ):
            thread = threading.Thread(
                target=self._listen, args=(topic, action), name=f"doorbell-{topic}", daemon=True
            )
            thread.start()
            self._listeners.append(thread)

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._listeners:
            thread.join(5)
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
