"""``triage-node serve``: one supervisor, N receiver processes, and the scheduler.

The supervisor binds the DICOM port once and hands the listening socket to N receiver processes
(forked by a fork server, one per core by default) so associations use every core despite the
GIL. It restarts a receiver that dies, runs the scheduler, and on SIGTERM stops taking
associations, lets the ones in progress finish (``service.shutdown_grace_seconds``) and exits 0.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import IO, Any

from triage_node import __version__
from triage_node.analysis.allocator import keep_large_buffers
from triage_node.analysis.runtime import ModelSession
from triage_node.config import Config, DicomConfig
from triage_node.db.database import Database
from triage_node.db.engine import make_engine, redact_url, require_current_schema, upgrade
from triage_node.db.intake import Intake
from triage_node.db.notify import Notifier
from triage_node.dicom.balance import AcceptBalance, Counts
from triage_node.dicom.native.build import available, ensure_program, find_program
from triage_node.dicom.native.handover import DcmtkTransport
from triage_node.dicom.server import (
    ReceiverServer,
    build_ae,
    configure_pynetdicom,
    server_tls_context,
)
from triage_node.dicom.storage_scp import StorageHandlers
from triage_node.domain import utcnow
from triage_node.errors import AlreadyRunning, ModelError, TriageError
from triage_node.logs import configure_logging, get_logger, log_event
from triage_node.service.doorbell import JOBS, OUTBOX, STUDIES, Doorbell, ring, run_dir
from triage_node.service.lifetime import die_with_parent
from triage_node.service.listeners import (
    open_hl7_listener,
    open_listener,
    open_metrics_endpoint,
    open_stow_receiver,
    open_tls_listener,
    open_web_interface,
)
from triage_node.service.relay import Announcer, Relay
from triage_node.service.scheduler import ServiceScheduler
from triage_node.service.worker import Worker
from triage_node.spool import Spool, pid_alive

LOG = get_logger(__name__)
_RESTART_BACKOFF_SECONDS = (1, 2, 5, 10, 30)


def receiver_count(config: DicomConfig) -> int:
    return config.receivers or max(1, min(os.cpu_count() or 1, 8))


def _lock_data_dir(data_dir: Path) -> IO[str]:
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    handle = open(data_dir / "serve.lock", "w")  # noqa: SIM115 - held for the process's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise AlreadyRunning(
            f"another 'triage-node serve' already uses the data directory {data_dir}"
        ) from None
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def prepare_database(config: Config) -> Database:
    """Open the database and bring its schema up to date (or insist that it is)."""
    engine = make_engine(config.database_url, busy_timeout=config.database.busy_timeout)
    if config.database.auto_upgrade:
        revision = upgrade(engine)
        log_event(
            LOG,
            logging.INFO,
            "schema_ready",
            "database schema is current",
            revision=revision,
            database=redact_url(config.database_url),
        )
    else:
        require_current_schema(engine)
    return Database(engine)


def _child_process_setup(config: Config) -> threading.Event:
    """Signals, parent-death and logging of a child process; the event is set on SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor turns Ctrl-C into SIGTERM
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    die_with_parent()  # the fork server, which dies with the supervisor: no orphan keeps the port
    configure_logging(config.log.level, config.log.format)
    return stop


def run_receiver(
    config: Config,
    listen_socket: socket.socket,
    tls_socket: socket.socket | None,
    loads: Counts,
    index: int,
) -> None:
    """Entry point of a receiver process: the DICOM port and, when configured, the TLS port;
    *loads*: the receivers' open connections, shared (dicom.balance)."""
    stop = _child_process_setup(config)

    spool = Spool(config.storage.spool_path)
    incoming = spool.incoming_dir()
    configure_pynetdicom(incoming)
    engine = make_engine(config.database_url, busy_timeout=config.database.busy_timeout)
    doorbells = run_dir(config.storage.data_dir)
    handlers = StorageHandlers(
        spool,
        Intake(engine),
        config.storage.min_free_mb * 2**20,
        on_association_end=lambda: ring(doorbells, STUDIES),
    )
    ae = build_ae(config.dicom)
    balance = AcceptBalance(loads, index)
    died = threading.Event()
    transport = _dcmtk_transport(config, incoming, died, stop)
    servers = [
        ReceiverServer(
            ae, listen_socket, config.dicom, handlers, balance=balance, transport=transport
        )
    ]
    if tls_socket is not None:
        context = server_tls_context(config.dicom)
        servers.append(
            ReceiverServer(ae, tls_socket, config.dicom, handlers, context, balance=balance)
        )
    for number, server in enumerate(servers):
        threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.5},
            name=f"accept-{number}",
            daemon=True,
        ).start()
    log_event(LOG, logging.INFO, "receiver_started", "receiver ready", receiver=index)

    def active() -> list[Any]:
        return [assoc for server in servers for assoc in server.active_associations]

    def busy() -> bool:
        return bool(active()) or (transport is not None and transport.active > 0)

    stop.wait()
    for server in servers:
        server.shutdown()
    grace = 0.0 if died.is_set() else config.service.shutdown_grace_seconds
    deadline = time.monotonic() + grace
    while busy() and time.monotonic() < deadline:
        time.sleep(0.05)
    remaining = active()
    cut_off = len(remaining) + (transport.active if transport is not None else 0)
    for assoc in remaining:
        assoc.abort()
    if transport is not None:
        transport.stop(0.0)  # whatever DCMTK still serves is cut off with it
    log_event(
        LOG,
        logging.INFO,
        "receiver_stopped",
        "receiver stopped",
        receiver=index,
        aborted_associations=cut_off,
    )
    engine.dispose()
    if died.is_set():
        raise SystemExit(1)  # the supervisor restarts the receiver, and DCMTK with it


def _dcmtk_transport(
    config: Config, incoming: Path, died: threading.Event, stop: threading.Event
) -> DcmtkTransport | None:
    """The receiver's DCMTK program (``dicom.transport = "dcmtk"``; the supervisor built it),
    started; its death sets *died* and stops the receiver."""
    if config.dicom.transport != "dcmtk":
        return None
    program = find_program(config.storage.data_dir)
    if program is None:
        raise TriageError("the DCMTK receiver program is missing (the supervisor builds it)")

    def on_death() -> None:
        died.set()
        stop.set()

    transport = DcmtkTransport(program, config.dicom, incoming, on_death)
    transport.start()
    return transport


def run_worker(config: Config, index: int) -> None:
    """Entry point of a worker process: load the model (retrying while it is missing), work."""
    stop = _child_process_setup(config)
    keep_large_buffers()
    engine = make_engine(config.database_url, busy_timeout=config.database.busy_timeout)
    announce = Announcer(run_dir(config.storage.data_dir), Notifier(engine))
    model = None
    while model is None and not stop.is_set():
        try:
            model = ModelSession(
                config.worker.model_dir, intra_op_threads=config.worker.intra_op_threads
            )
        except ModelError as exc:
            log_event(
                LOG,
                logging.ERROR,
                "model_unavailable",
                f"no usable model; jobs wait in the queue: {exc}",
                worker=index,
            )
            stop.wait(config.worker.model_retry_seconds)
    if model is not None:
        database = Database(engine)
        worker = Worker(
            database.queue,
            database.outbox,
            database.processes,
            Spool(config.storage.spool_path),
            model,
            config.worker,
            destinations=config.delivery.destinations,
            on_results=lambda: announce(OUTBOX),
        )
        log_event(LOG, logging.INFO, "worker_started", "worker ready", worker=index)
        try:
            doorbell = Doorbell(announce.doorbells, JOBS)
        except OSError as exc:  # it still looks every worker.poll_seconds
            log_event(LOG, logging.WARNING, "doorbell_failed", f"no jobs doorbell: {exc}")
            worker.run_forever(stop)
        else:
            with doorbell:
                worker.run_forever(stop, doorbell)
    log_event(LOG, logging.INFO, "worker_stopped", "worker stopped", worker=index)
    engine.dispose()


def _process_context() -> multiprocessing.context.ForkServerContext:
    """How children start: forked by a fork server, a process that imported this module (and
    so everything a receiver or worker runs) once and does nothing else. A child then starts in
    about 0.1 s of CPU instead of importing pydicom, pynetdicom, SQLAlchemy and ONNX Runtime
    again (about 1.5 s each, spawned), and a restart after a crash is as quick. The fork server
    holds no thread, lock or connection of the supervisor's (it is started with only its own
    pipes; its only threads are the pool numpy's OpenBLAS starts on import, which OpenBLAS
    stops and restarts around a fork by its own pthread_atfork handlers); it dies with the
    supervisor (``forkserver_death``), and the children with it."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["triage_node.service.forkserver_death", __name__])
    return context


class ProcessGroup:
    """Child processes of one kind, restarted with backoff when one dies."""

    def __init__(
        self, kind: str, target: Callable[..., None], args: tuple[Any, ...], count: int
    ) -> None:
        self.kind = kind
        self.target = target
        self.args = args
        self.context = _process_context()
        self.processes: list[BaseProcess | None] = [None] * count
        self.restarts = [0] * count
        self.next_start = [0.0] * count

    def _start(self, index: int) -> None:
        process = self.context.Process(
            target=self.target, args=(*self.args, index), name=f"triage-node-{self.kind}-{index}"
        )
        process.start()
        self.processes[index] = process

    def start_all(self) -> None:
        for index in range(len(self.processes)):
            self._start(index)

    def check(self) -> None:
        """Restart children that died (with backoff)."""
        now = time.monotonic()
        for index, process in enumerate(self.processes):
            if process is not None and process.is_alive():
                continue
            if process is not None:
                log_event(
                    LOG,
                    logging.ERROR,
                    f"{self.kind}_died",
                    f"{self.kind} process died; restarting",
                    index=index,
                    exitcode=process.exitcode,
                )
                delay = _RESTART_BACKOFF_SECONDS[
                    min(self.restarts[index], len(_RESTART_BACKOFF_SECONDS) - 1)
                ]
                self.restarts[index] += 1
                self.next_start[index] = now + delay
                self.processes[index] = None
            if now >= self.next_start[index]:
                self._start(index)

    def stop_all(self, grace: float) -> None:
        live = [p for p in self.processes if p is not None and p.is_alive()]
        for process in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid or 0, signal.SIGTERM)
        deadline = time.monotonic() + grace + 5
        for process in live:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        log_event(
            LOG, logging.INFO, "stopping", "stop requested", signal=signal.Signals(signum).name
        )
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop


def _private_files() -> None:
    """Everything the service creates (spool, SQLite database and journal, results) is for
    the service user alone: files 0600, directories 0700, whatever umask it was started with."""
    os.umask(0o077)


def serve_workers(config: Config) -> int:
    """``triage-node worker``: analysis workers alone, sharing the database and spool."""
    _private_files()
    configure_logging(config.log.level, config.log.format)
    store = prepare_database(config)
    interrupted = store.queue.recover_interrupted(pid_alive, utcnow())
    count = config.worker.count or 1
    stop = _stop_on_signals()
    workers = ProcessGroup("worker", run_worker, (config,), count)
    relay = Relay(run_dir(config.storage.data_dir), Notifier(store.engine))  # jobs queued elsewhere
    try:
        relay.start()
        workers.start_all()
        log_event(
            LOG,
            logging.INFO,
            "workers_started",
            "workers running",
            workers=count,
            interrupted_jobs=interrupted,
        )
        while not stop.wait(0.5):
            workers.check()
    finally:
        workers.stop_all(config.service.shutdown_grace_seconds)
        relay.stop()
        store.engine.dispose()
        log_event(LOG, logging.INFO, "workers_stopped", "workers stopped")
    return 0


def choose_transport(config: Config) -> Config:
    """*config* with ``dicom.transport`` settled: "dcmtk" with its program built (an error
    when it cannot be), "pynetdicom", or for "auto" the first where it can be had; logged."""
    chosen, program, reason = config.dicom.transport, None, ""
    if chosen == "dcmtk":
        program = ensure_program(config.storage.data_dir)
    elif chosen == "auto":
        program, reason = available(config.storage.data_dir)
        chosen = "dcmtk" if program is not None else "pynetdicom"
    how = "" if config.dicom.transport != "auto" else f" (auto: {reason})" if reason else " (auto)"
    log_event(
        LOG,
        logging.INFO,
        "dicom_transport",
        f"DICOM transport: {chosen}{how}",
        transport=chosen,
        program=str(program) if program is not None else None,
    )
    return replace(config, dicom=replace(config.dicom, transport=chosen))


def serve(config: Config) -> int:
    """Run the node until SIGTERM or SIGINT; return the exit status."""
    _private_files()
    configure_logging(config.log.level, config.log.format)
    lock = _lock_data_dir(config.storage.data_dir)
    store = prepare_database(config)
    spool = Spool(config.storage.spool_path)
    spool.prepare()
    purged = spool.purge_stale_incoming()
    shutil.rmtree(run_dir(config.storage.data_dir), ignore_errors=True)  # doorbells of the dead
    lost = store.intake.close_lost_associations(pid_alive, utcnow())
    interrupted = store.queue.recover_interrupted(pid_alive, utcnow())
    config = choose_transport(config)  # built once, before any receiver
    listen_socket = open_listener(config.dicom)
    tls_socket = open_tls_listener(config.dicom)
    count = receiver_count(config.dicom)
    stop = _stop_on_signals()
    loads = _process_context().RawArray("i", count)  # dicom.balance
    receivers = ProcessGroup(
        "receiver", run_receiver, (config, listen_socket, tls_socket, loads), count
    )
    workers = ProcessGroup("worker", run_worker, (config,), config.worker.count)
    scheduler = ServiceScheduler(store, config)
    relay = Relay(run_dir(config.storage.data_dir), Notifier(store.engine))  # workers elsewhere
    hl7_server = metrics_server = stow_server = web_server = None
    doorbells = run_dir(config.storage.data_dir)
    try:
        relay.start()
        hl7_server = open_hl7_listener(config, store)
        stow_server = open_stow_receiver(config, store, lambda: ring(doorbells, STUDIES))
        web_server = open_web_interface(config, store)
        metrics_server = open_metrics_endpoint(config)
        receivers.start_all()
        workers.start_all()
        scheduler.start()
        log_event(
            LOG,
            logging.INFO,
            "service_started",
            "triage-node is listening",
            ae_title=config.dicom.ae_title,
            bind=config.dicom.bind,
            port=config.dicom.port,
            tls_port=config.dicom.tls_port or None,
            client_certificates=config.dicom.tls_verify_client if tls_socket else None,
            receivers=count,
            workers=config.worker.count,
            hl7_port=config.hl7.port or None,
            dicomweb_port=config.dicomweb.port or None,
            web_port=config.web.port or None,
            metrics_port=config.service.metrics_port or None,
            version=__version__,
            database=redact_url(config.database_url),
            spool=str(spool.root),
            purged_partial_files=purged,
            lost_associations=lost,
            interrupted_jobs=interrupted,
        )
        while not stop.wait(0.5):
            receivers.check()
            workers.check()
    finally:
        receivers.stop_all(config.service.shutdown_grace_seconds)
        workers.stop_all(config.service.shutdown_grace_seconds)
        listen_socket.close()
        if tls_socket is not None:
            tls_socket.close()
        if stow_server is not None:
            stow_server.stop()
        if web_server is not None:
            web_server.stop()
        if hl7_server is not None:
            hl7_server.stop()
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        scheduler.stop()
        relay.stop()
        with contextlib.suppress(Exception):
            store.processes.service_stopped(utcnow())
        store.engine.dispose()
        log_event(LOG, logging.INFO, "service_stopped", "triage-node stopped")
        lock.close()
    return 0
