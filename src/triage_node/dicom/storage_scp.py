"""The DICOM receiver: Verification and Storage SCP (PS3.4 Annex A and B) on pynetdicom.

The C-STORE handler only saves, records and answers. pynetdicom streams each dataset to a file
in the spool's incoming directory as it arrives (``STORE_RECV_CHUNKED_DATASET``); the handler
checks the header, fsyncs and renames the file into the spool, commits its row, and only then
answers Success. Pixels are never decoded here.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import socketserver
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from triage_node.config import DicomConfig
from triage_node.domain import AssociationEnd, InstanceHeader, utcnow
from triage_node.errors import (
    DatabaseUnavailable,
    DatasetError,
    InvalidUID,
    OutOfResources,
    TriageError,
)
from triage_node.logs import get_logger, log_event
from triage_node.spool import Spool

if TYPE_CHECKING:  # the aggregate is passed in when the handlers are bound
    from triage_node.db.intake import Intake

LOG = get_logger(__name__)

# C-STORE response statuses (PS3.4 Annex B.2.3, PS3.7 Annex C).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110
ERROR_COMMENT_MAX = 64  # (0000,0902) Error Comment is LO

# A-ASSOCIATE-RJ for a peer outside the address allow-list: rejected-permanent (1),
# DICOM UL service-user (1), no-reason-given (1) (PS3.8 Section 9.3.4; no reason code
# exists for network addresses).
_REJECT_ADDRESS = (0x01, 0x01, 0x01)

# (source, diagnostic) of A-ASSOCIATE-RJ (PS3.8 Table 9-21) as people read them.
_REJECT_REASONS: dict[tuple[int | None, int | None], str] = {
    (1, 3): "calling AE title not allowed",
    (1, 7): "called AE title is not this node's",
    (2, 1): "user identity not accepted",
    (3, 2): "too many associations (local limit exceeded)",
}

# Everything a radiograph study can arrive in (PS3.5 Section 10 and Annex A).
TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
)


def supported_contexts() -> list[PresentationContext]:
    """Verification plus every storage SOP class pynetdicom knows, each in every syntax above."""
    contexts = []
    for abstract in [Verification, *(cx.abstract_syntax for cx in AllStoragePresentationContexts)]:
        cx = PresentationContext()
        cx.abstract_syntax = abstract
        cx.transfer_syntax = list(TRANSFER_SYNTAXES)
        contexts.append(cx)
    return contexts


def read_header(path: Path) -> InstanceHeader:
    """Read the header fields the node keeps, stopping before Pixel Data.

    Raises DatasetError when the dataset cannot be parsed or a required UID is missing/invalid.
    """
    try:
        ds = dcmread(path, stop_before_pixels=True)
        transfer_syntax = str(ds.file_meta.TransferSyntaxUID)

        def text(keyword: str) -> str:
            value = ds.get(keyword, "")
            return "" if value is None else str(value).strip()

        return InstanceHeader(
            study_uid=text("StudyInstanceUID"),
            series_uid=text("SeriesInstanceUID"),
            sop_instance_uid=text("SOPInstanceUID"),
            sop_class_uid=text("SOPClassUID"),
            transfer_syntax_uid=transfer_syntax,
            modality=text("Modality"),
            body_part=text("BodyPartExamined"),
            series_description=text("SeriesDescription"),
            accession_number=text("AccessionNumber"),
            study_date=text("StudyDate"),
        )
    except InvalidUID as exc:
        raise DatasetError(str(exc)) from None
    except Exception as exc:  # pydicom raises many types for malformed data
        raise DatasetError(f"cannot parse dataset: {type(exc).__name__}") from exc


def _status(code: int, comment: str | None = None) -> Dataset:
    rsp = Dataset()
    rsp.Status = code
    if comment:
        rsp.ErrorComment = comment[:ERROR_COMMENT_MAX]
    return rsp


class StorageHandlers:
    """The event handlers of one receiver process, with their collaborators bound in."""

    def __init__(
        self,
        spool: Spool,
        intake: Intake,
        min_free_bytes: int,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.spool = spool
        self.intake = intake
        self.min_free_bytes = min_free_bytes
        self.clock = clock
        self._association_ids: dict[Any, int] = {}
        self._lock = threading.Lock()

    def bindings(self) -> list[Any]:
        return [
            (evt.EVT_C_STORE, self.on_c_store),
            (evt.EVT_ESTABLISHED, self.on_established),
            (evt.EVT_CONN_CLOSE, self.on_closed),
            (evt.EVT_REJECTED, self.on_rejected),
        ]

    # -- associations ------------------------------------------------------------------------

    def on_established(self, event: Any) -> None:
        requestor = event.assoc.requestor
        try:
            association_id = self.intake.open_association(
                calling_ae=requestor.ae_title,
                called_ae=event.assoc.acceptor.ae_title,
                peer_address=str(requestor.address),
                now=self.clock(),
            )
        except DatabaseUnavailable as exc:
            log_event(
                LOG,
                logging.ERROR,
                "association_record_failed",
                "could not record the association",
                error=exc.cause,
            )
            return
        with self._lock:
            self._association_ids[event.assoc] = association_id
        log_event(
            LOG,
            logging.INFO,
            "association_accepted",
            "association accepted",
            association=association_id,
            calling_ae=requestor.ae_title,
            peer=str(requestor.address),
        )

    def on_closed(self, event: Any) -> None:
        _stop_waiting_for_request(event.assoc)
        self._record_end(event.assoc)

    def association_finished(self, assoc: Any) -> None:
        """After the association's thread ended, whatever ended it."""
        _remove_partial_dataset(assoc)
        self._record_end(assoc)

    def _record_end(self, assoc: Any) -> None:
        with self._lock:
            association_id = self._association_ids.pop(assoc, None)
        if association_id is None:
            return
        how = AssociationEnd.RELEASED if assoc.is_released else AssociationEnd.ABORTED
        try:
            self.intake.close_association(association_id, how, self.clock())
        except DatabaseUnavailable as exc:
            log_event(
                LOG,
                logging.ERROR,
                "association_record_failed",
                "could not record the end of the association",
                error=exc.cause,
            )
        log_event(
            LOG,
            logging.INFO,
            "association_ended",
            "association ended",
            association=association_id,
            end=how.value,
        )

    def on_rejected(self, event: Any) -> None:
        requestor = event.assoc.requestor
        sent = event.assoc.acceptor.primitive
        key = (getattr(sent, "result_source", None), getattr(sent, "diagnostic", None))
        log_event(
            LOG,
            logging.WARNING,
            "association_rejected",
            f"association rejected: {_REJECT_REASONS.get(key, 'see PS3.8 Table 9-21')}",
            calling_ae=requestor.ae_title,
            called_ae=event.assoc.acceptor.ae_title,
            peer=str(requestor.address),
            source=key[0],
            diagnostic=key[1],
        )

    # -- C-STORE -----------------------------------------------------------------------------

    def on_c_store(self, event: Any) -> Dataset:
        """Store one instance durably, then answer (PS3.4 Annex B.2.3)."""
        started = time.perf_counter()
        partial = Path(event.dataset_path)
        request = event.request
        sop_uid = str(request.AffectedSOPInstanceUID)
        with self._lock:
            association_id = self._association_ids.get(event.assoc)
        try:
            code, comment = self._store(partial, request, association_id)
        except Exception:  # a bug must not take the receiver down; the PACS will resend
            LOG.exception(
                "unexpected failure storing an instance",
                extra={"action": "store_failed", "sop_instance_uid": sop_uid},
            )
            code, comment = PROCESSING_FAILURE, "internal error; see the node's log"
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()  # nothing partial stays behind
        level = logging.DEBUG if code == SUCCESS else logging.WARNING
        log_event(
            LOG,
            level,
            "instance_stored" if code == SUCCESS else "instance_refused",
            "instance stored" if code == SUCCESS else f"instance refused: {comment}",
            sop_instance_uid=sop_uid,
            status=f"0x{code:04X}",
            calling_ae=event.assoc.requestor.ae_title,
            association=association_id,
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
        return _status(code, comment)

    def _store(self, partial: Path, request: Any, association_id: int | None) -> tuple[int, str]:
        try:
            self.spool.ensure_free(self.min_free_bytes)
        except OutOfResources as exc:
            return OUT_OF_RESOURCES, str(exc)
        try:
            header = read_header(partial)
        except DatasetError as exc:
            return CANNOT_UNDERSTAND, str(exc)
        if header.sop_instance_uid != str(request.AffectedSOPInstanceUID):
            return CANNOT_UNDERSTAND, "SOP Instance UID differs from the C-STORE request"
        if header.sop_class_uid != str(request.AffectedSOPClassUID):
            return DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID differs from the request"
        try:
            spooled = self.spool.commit(partial, header)
        except OutOfResources as exc:
            return OUT_OF_RESOURCES, str(exc)
        try:
            recorded = self.intake.record_instance(header, spooled, association_id, self.clock())
        except DatabaseUnavailable as exc:
            if not spooled.replaced:
                self.spool.remove(spooled.relpath)
            log_event(
                LOG,
                logging.ERROR,
                "database_write_failed",
                "could not record an instance",
                sop_instance_uid=header.sop_instance_uid,
                error=exc.cause,
            )
            return OUT_OF_RESOURCES, "database unavailable; try again later"
        if recorded.reopened:
            log_event(
                LOG,
                logging.INFO,
                "study_reopened",
                "instance arrived for a queued study",
                study_uid=header.study_uid,
                sop_instance_uid=header.sop_instance_uid,
            )
        return SUCCESS, ""


def _stop_waiting_for_request(assoc: Any) -> None:
    """End an acceptor whose connection is gone before a usable A-ASSOCIATE-RQ.

    pynetdicom's association thread waits for the request for the whole ACSE timeout, holding
    an association slot, also after its connection closed (garbage, a wrong PDU, a cut request:
    it answered A-ABORT) or its state machine died (a request it cannot turn into a primitive,
    such as presentation context ID 0): a handful of such connections would lock every PACS
    out. An empty item in its queue ends the wait at once.
    """
    if assoc.is_established or getattr(assoc.requestor, "primitive", None) is not None:
        return
    with contextlib.suppress(AttributeError):
        assoc.dul.to_user_queue.put(None)


def _remove_partial_dataset(assoc: Any) -> None:
    """The file of a dataset still arriving when the connection ended (an abort, a full disk:
    pynetdicom aborts when its write fails) is never answered, so nothing keeps it."""
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    handle = getattr(message, "_data_set_file", None)
    path = getattr(message, "_data_set_path", None)
    with contextlib.suppress(OSError, ValueError):
        if handle is not None:
            handle.close()
    if path is not None:
        with contextlib.suppress(OSError):
            Path(path).unlink()


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
        if not self._peer_sent_data(sock):
            # A bare TCP check (load balancer, port scan): pynetdicom would keep a thread and an
            # association slot waiting for the A-ASSOCIATE-RQ until the ACSE timeout.
            log_event(
                LOG,
                logging.DEBUG,
                "connection_closed",
                "connection closed before a request",
                peer=address,
            )
            with contextlib.suppress(OSError):
                sock.close()
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
        # pynetdicom's handle(), then this connection's thread waits for its association to
        # end, to tidy up after it however it ended (an exception inside pynetdicom's state
        # machine, such as a full disk while a dataset arrives, ends it without any event).
        assoc = self._create_association()
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        while assoc.is_alive():
            assoc.join(0.5)
            dul = assoc.dul
            if dul.ident is not None and not dul.is_alive():  # its state machine died
                _stop_waiting_for_request(assoc)
        self.server.handlers.association_finished(assoc)

    def _tls_handshake(self, sock: socket.socket, address: str) -> ssl.SSLSocket | None:
        """The server side of the TLS handshake, in this connection's thread (pynetdicom would
        do it in the accept loop, where one slow peer stalls every other)."""
        assert self.server.tls_context is not None
        previous = sock.gettimeout()
        try:
            sock.settimeout(self.server.ae.acse_timeout)
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

    def _peer_sent_data(self, sock: socket.socket) -> bool:
        previous = sock.gettimeout()
        try:
            sock.settimeout(self.server.ae.acse_timeout)
            return bool(sock.recv(1, socket.MSG_PEEK))
        except OSError:
            return False
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(previous)


class ReceiverServer(ThreadedAssociationServer):
    """An association server on a listening socket made by the service (shared by receivers).

    The service binds the port once; every receiver process accepts from the same socket,
    which is non-blocking so a process that loses the race for a connection returns at once.
    """

    def __init__(
        self,
        ae: AE,
        listen_socket: socket.socket,
        config: DicomConfig,
        handlers: StorageHandlers,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self._listen_socket = listen_socket
        self.tls_context = tls_context  # applied per connection by _RequestHandler
        self.handlers = handlers
        self.daemon_threads = True  # a connection's thread never holds the process up
        self._allowed = [ipaddress.ip_network(n, strict=False) for n in config.allowed_networks]
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

    def address_allowed(self, address: str) -> bool:
        if not self._allowed:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self._allowed)


def configure_pynetdicom(incoming_dir: Path) -> None:
    """Process-wide pynetdicom settings for a receiver process.

    Datasets are streamed to files in *incoming_dir* (same file system as the spool, so
    storing is a rename); identifiers of requests are never logged.
    """
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    tempfile.tempdir = str(incoming_dir)


def build_ae(config: DicomConfig) -> AE:
    """The application entity with the node's title, limits, timeouts and allow-lists."""
    ae = AE(ae_title=config.ae_title)
    ae.require_called_aet = config.require_called_ae
    ae.require_calling_aet = list(config.allowed_calling_aes)
    ae.maximum_associations = config.max_associations
    ae.maximum_pdu_size = config.max_pdu_size
    ae.acse_timeout = config.acse_timeout
    ae.dimse_timeout = config.dimse_timeout
    ae.network_timeout = config.network_timeout
    ae.supported_contexts = supported_contexts()
    return ae
