"""The socket server of a receiver process: the address allow-list, TLS, rejections and the
association threads (pynetdicom's ``ThreadedAssociationServer`` with a request handler of ours),
and the Application Entity the handlers are bound to."""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

import pynetdicom.dimse_messages
from pynetdicom import AE, _config, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from triage_node.config import DicomConfig
from triage_node.dicom.admission import (
    NO_REQUEST,
    Admission,
    AdmissionLimits,
    RefusalLog,
    Rejector,
    await_request,
    await_request_start,
    drain,
    peer_gone,
)
from triage_node.dicom.balance import AcceptBalance
from triage_node.dicom.identity import node_ae, stamp_received_files
from triage_node.dicom.native.handover import DcmtkTransport
from triage_node.dicom.pdu_reads import read_pdus_whole
from triage_node.dicom.reactor import close_doorbells, quiet_idle_associations, ring_on_traffic
from triage_node.dicom.storage_scp import (
    StorageHandlers,
    stop_waiting_for_request,
    supported_contexts,
)
from triage_node.errors import TriageError
from triage_node.logs import get_logger, log_event
from triage_node.networks import AllowedNetworks, parse_networks
from triage_node.spool import received_file

LOG = get_logger(__name__)

# A-ASSOCIATE-RJ for a peer outside the address allow-list: rejected-permanent (1),
# DICOM UL service-user (1), no-reason-given (1) (PS3.8 Section 9.3.4; no reason code
# exists for network addresses).
_REJECT_ADDRESS = (0x01, 0x01, 0x01)


def _reject_connection(sock: socket.socket, timeout: float = 5.0) -> None:
    """Answer an association request with A-ASSOCIATE-RJ and close the connection."""
    try:
        sock.settimeout(timeout)
        header = sock.recv(6)  # PDU type, reserved, length: read before answering (PS3.8 9.3.1)
        if len(header) == 6 and header[0] == 0x01:
            pdu = A_ASSOCIATE_RJ()
            pdu.result, pdu.source, pdu.reason_diagnostic = _REJECT_ADDRESS
            sock.sendall(pdu.encode())
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sock.close()


def server_tls_context(config: DicomConfig) -> ssl.SSLContext:
    """The TLS context of the ``dicom.tls_port`` listener (PS3.15 B.1, TLS 1.2 or newer).

    With ``tls_verify_client`` a peer must present a certificate signed by ``tls_ca_file``.
    Raises TriageError naming the file when a certificate or key cannot be loaded.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(config.tls_cert_file), str(config.tls_key_file))
    except (OSError, ssl.SSLError) as exc:
        raise TriageError(
            f"cannot load the TLS certificate {config.tls_cert_file} with key "
            f"{config.tls_key_file}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    if config.tls_verify_client:
        try:
            context.load_verify_locations(cafile=str(config.tls_ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise TriageError(
                f"cannot load the client CA file {config.tls_ca_file}: "
                f"{getattr(exc, 'strerror', None) or exc}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class _RequestHandler(RequestHandler):
    """Per-connection entry: TCP_NODELAY, the TLS handshake on a TLS listener, then the address
    allow-list, then pynetdicom."""

    server: ReceiverServer

    def handle(self) -> None:
        sock = self.request
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        address = str(self.client_address[0])
        timeout = self.server.admission.limits.request_timeout
        if self.server.tls_context is None:
            refused = await_request(sock, timeout)
        else:  # the request comes encrypted: the deadline covers the first bytes, then TLS
            refused = await_request_start(sock, timeout)
        if refused is not None:
            self._close_unasked(sock, address, refused)
            return
        if self.server.tls_context is not None:
            wrapped = self._tls_handshake(sock, address)
            if wrapped is None:
                return
            self.request = sock = wrapped
        if not self.server.address_allowed(address):
            log_event(
                LOG,
                logging.WARNING,
                "association_rejected",
                "association rejected: source address not allowed",
                peer=address,
            )
            _reject_connection(sock)
            return
        if self.server.transport is not None:  # DCMTK serves it; this thread answers it
            self.server.transport.serve(sock, address, self.server.handlers)
            return
        # pynetdicom's handle(), then this connection's thread waits for its association to
        # end, to tidy up after it however it ended (an exception inside pynetdicom's state
        # machine, such as a full disk while a dataset arrives, ends it without any event).
        assoc = self._create_association()
        assoc.network_timeout_response = "A-RELEASE"  # an idle association: released, as DCMTK's
        ring_on_traffic(assoc)  # its threads wake on traffic, not on a 1 ms tick (dicom.reactor)
        try:
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            while assoc.is_alive():
                assoc.join(0.5)
                dul = assoc.dul
                if dul.ident is not None and not dul.is_alive():  # its state machine died
                    stop_waiting_for_request(assoc)
        finally:
            close_doorbells(assoc)
            self.server.handlers.association_finished(assoc)

    def _tls_handshake(self, sock: socket.socket, address: str) -> ssl.SSLSocket | None:
        """The server side of the TLS handshake, in this connection's thread (pynetdicom would
        do it in the accept loop, where one slow peer stalls every other)."""
        assert self.server.tls_context is not None
        previous = sock.gettimeout()
        try:
            sock.settimeout(self.server.admission.limits.request_timeout)
            wrapped = self.server.tls_context.wrap_socket(sock, server_side=True)
            wrapped.settimeout(previous)
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
            log_event(
                LOG,
                logging.WARNING,
                "tls_handshake_failed",
                f"TLS handshake failed: {reason}",
                peer=address,
            )
            with contextlib.suppress(OSError):
                sock.close()
            return None
        log_event(
            LOG,
            logging.DEBUG,
            "tls_established",
            "TLS connection established",
            peer=address,
            tls_version=wrapped.version(),
            client_certificate=wrapped.getpeercert() is not None,
        )
        return wrapped

    def _close_unasked(self, sock: socket.socket, address: str, reason: str) -> None:
        """Close a connection that asked for no association in time. A bare TCP check (load
        balancer, port scan) is routine and logged at DEBUG; a request that stalled is not."""
        if reason == NO_REQUEST:
            log_event(
                LOG,
                logging.DEBUG,
                "connection_closed",
                "connection closed before a request",
                peer=address,
            )
        else:
            self.server.refusals.refused(reason, address)
        drain(sock)
        with contextlib.suppress(OSError):
            sock.close()


class ReceiverServer(ThreadedAssociationServer):
    """An association server on a listening socket made by the service (shared by receivers).

    The service binds the port once; every receiver process accepts from the same socket,
    which is non-blocking so a process that loses the race for a connection returns at once.
    With *transport*, admitted connections are served by DCMTK (``dicom.native``) instead of
    pynetdicom.
    """

    def __init__(
        self,
        ae: AE,
        listen_socket: socket.socket,
        config: DicomConfig,
        handlers: StorageHandlers,
        tls_context: ssl.SSLContext | None = None,
        balance: AcceptBalance | None = None,
        transport: DcmtkTransport | None = None,
    ) -> None:
        self._listen_socket = listen_socket
        self.transport = transport
        self.balance = balance or AcceptBalance.alone()
        self.tls_context = tls_context  # applied per connection by _RequestHandler
        self.handlers = handlers
        self.daemon_threads = True  # a connection's thread never holds the process up
        self._allowed = AllowedNetworks(config.allowed_networks)
        self.admission = Admission(admission_limits(config))
        self.refusals = RefusalLog()
        self.rejector = Rejector()
        listen_socket.setblocking(False)
        address = listen_socket.getsockname()[:2]
        super().__init__(
            ae,
            address,
            config.ae_title,
            supported_contexts(),
            None,
            handlers.bindings(),
            _RequestHandler,
        )

    def server_bind(self) -> None:
        if self.socket is not None:
            self.socket.close()  # the placeholder socket TCPServer made
        self.socket = self._listen_socket
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """The service already called listen()."""

    def server_close(self) -> None:
        # Close only this process's descriptor; shutdown() would stop every receiver.
        if self.socket is not None:
            self.socket.close()

    def shutdown(self) -> None:
        """Stop accepting; associations in progress carry on."""
        socketserver.BaseServer.shutdown(self)  # pynetdicom's also closes the shared socket
        self.server_close()
        self.rejector.stop()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection, after letting a less busy receiver take it (dicom.balance);
        raises BlockingIOError (ignored by socketserver) when another receiver took it."""
        deferral = self.balance.deferral()
        if deferral > 0:
            time.sleep(deferral)
        return super().get_request()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Admit the connection (a slot, before any thread) or have it rejected; one whose peer
        has already gone without a word is just closed."""
        if peer_gone(request):
            self.shutdown_request(request)
            return
        address = str(client_address[0])
        refused = self.admission.admit(address)
        if refused is not None:
            self.refusals.refused(refused, address)
            self.rejector.reject(request)
            return
        self.balance.opened()
        try:
            super().process_request(request, client_address)  # its thread
        except Exception:
            self.admission.release(address)
            self.balance.closed()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.admission.release(str(client_address[0]))
            self.balance.closed()

    def address_allowed(self, address: str) -> bool:
        return self._allowed.allows(address)


def admission_limits(config: DicomConfig) -> AdmissionLimits:
    return AdmissionLimits(
        per_address=config.max_associations_per_address,
        total=config.max_associations,
        reserved_networks=parse_networks(config.reserved_networks),
        reserved=min(config.reserved_associations, config.max_associations),
        request_timeout=config.request_timeout,
    )


def configure_pynetdicom(incoming_dir: Path) -> None:
    """Process-wide pynetdicom settings for a receiver process.

    Datasets are streamed to files in *incoming_dir* (same file system as the spool, so
    storing is a rename) that start their own writeback as they grow (``spool.ReceivedFile``);
    identifiers of requests are never logged.
    """
    quiet_idle_associations()  # idle associations cost no CPU (dicom.reactor)
    read_pdus_whole()  # a PDU in as few reads as it arrives in (dicom.pdu_reads)
    stamp_received_files()  # their File Meta names the node (dicom.identity)
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    tempfile.tempdir = str(incoming_dir)
    pynetdicom.dimse_messages.NamedTemporaryFile = received_file(  # type: ignore[attr-defined,assignment]
        incoming_dir
    )


def build_ae(config: DicomConfig) -> AE:
    """The application entity with the node's title, limits, timeouts and allow-lists."""
    ae = node_ae(config.ae_title)
    ae.require_called_aet = config.require_called_ae
    ae.require_calling_aet = list(config.allowed_calling_aes)
    ae.maximum_associations = config.max_associations
    ae.maximum_pdu_size = config.max_pdu_size
    ae.acse_timeout = config.acse_timeout
    ae.dimse_timeout = config.dimse_timeout
    ae.network_timeout = config.network_timeout
    ae.supported_contexts = supported_contexts()
    return ae
