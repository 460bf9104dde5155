"""The sockets the service opens before it starts its processes: the DICOM port (plain and
TLS), the STOW-RS receiver, the HL7 listener, the web interface and the metrics endpoint, with
errors that say what is in the way."""

from __future__ import annotations

import errno
import logging
import socket
from typing import Any

from triage_node.config import Config, DicomConfig
from triage_node.credentials import Credentials
from triage_node.db.database import Database
from triage_node.dicom.server import server_tls_context
from triage_node.dicom.storing import Storer
from triage_node.dicomweb.server import StowServer
from triage_node.dicomweb.stow import StowApplication
from triage_node.domain import utcnow
from triage_node.errors import TriageError
from triage_node.hl7.mllp import MLLPServer
from triage_node.logs import get_logger, log_event
from triage_node.ops.exporter import start_metrics_server
from triage_node.service.reconciliation import OruHandler
from triage_node.spool import Spool
from triage_node.web.app import WebApp
from triage_node.web.server import WebServer

LOG = get_logger(__name__)


def open_listener(config: DicomConfig, port: int | None = None) -> socket.socket:
    """Bind and listen on the DICOM port (or *port*, the TLS one); a clear TriageError when
    that is not possible."""
    port = config.port if port is None else port
    family = socket.AF_INET6 if ":" in config.bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.bind, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise TriageError(f"port {port} on {config.bind} is already in use") from None
        if exc.errno == errno.EACCES:
            raise TriageError(
                f"no permission to listen on port {port} (ports below 1024 need "
                "CAP_NET_BIND_SERVICE)"
            ) from None
        raise TriageError(f"cannot listen on {config.bind}:{port}: {exc.strerror}") from None
    sock.listen(128)
    return sock


def open_tls_listener(config: DicomConfig) -> socket.socket | None:
    """The ``dicom.tls_port`` listener, after checking that its certificate and key load."""
    if not config.tls_port:
        return None
    server_tls_context(config)  # a bad certificate stops the service here, not in a receiver
    return open_listener(config, config.tls_port)


def _port_error(what: str, bind: str, port: int, exc: OSError) -> TriageError:
    if exc.errno == errno.EADDRINUSE:
        return TriageError(f"{what} port {port} on {bind} is already in use")
    return TriageError(f"cannot listen for {what} on {bind}:{port}: {exc.strerror or exc}")


def open_hl7_listener(config: Config, store: Database) -> MLLPServer | None:
    """The ORU^R01 listener of ``[hl7]``, started; None when ``hl7.port`` is 0."""
    hl7 = config.hl7
    if not hl7.port:
        return None
    handler = OruHandler(store.priority, hl7.accession_fields)
    try:
        server = MLLPServer((hl7.bind, hl7.port), handler, hl7.allowed_networks)
    except OSError as exc:
        raise _port_error("HL7", hl7.bind, hl7.port, exc) from None
    server.start()
    return server


def open_stow_receiver(config: Config, store: Database, on_request_end: Any) -> StowServer | None:
    """The STOW-RS receiver of ``[dicomweb]``, serving; None when ``dicomweb.port`` is 0."""
    web = config.dicomweb
    if not web.port:
        return None
    spool = Spool(config.storage.spool_path)
    incoming = spool.incoming_dir()
    incoming.mkdir(parents=True, exist_ok=True)
    storer = Storer(spool, store.intake, config.storage.min_free_mb * 2**20, utcnow)
    credentials = Credentials(web.tokens, web.users, allow_anonymous=web.allow_anonymous)
    app = StowApplication(
        storer,
        store.intake,
        incoming,
        credentials,
        base_path=web.base_path,
        allowed_networks=web.allowed_networks,
        max_request_bytes=web.max_request_mb * 10**6,
        called_ae=config.dicom.ae_title,
        on_request_end=on_request_end,
        client_certificates=web.tls_verify_client,
    )
    return StowServer(web, app).start()


def open_web_interface(config: Config, store: Database) -> WebServer | None:
    """The web interface of ``[web]``, serving; None when ``web.port`` is 0."""
    if not config.web.port:
        return None
    if not store.web_access.users():
        log_event(
            LOG,
            logging.WARNING,
            "web_no_users",
            "the web interface has no users yet: add one with 'triage-node users add NAME "
            "--role admin'",
        )
    return WebServer(config.web, WebApp(config, store)).start()


def open_metrics_endpoint(config: Config) -> Any:
    """Prometheus ``/metrics`` (``service.metrics_port``); None when the port is 0."""
    service = config.service
    if not service.metrics_port:
        return None
    try:
        server, _thread = start_metrics_server(config)
    except OSError as exc:
        raise _port_error("metrics", service.metrics_bind, service.metrics_port, exc) from None
    return server
