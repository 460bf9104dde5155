"""The DICOM receiver: Verification and Storage SCP (PS3.4 Annex A and B) on pynetdicom.

The C-STORE handler only saves, records and answers. pynetdicom streams each dataset to a file
in the spool's incoming directory as it arrives (``STORE_RECV_CHUNKED_DATASET``); the handler
checks the header, fsyncs and renames the file into the spool, commits its row, and only then
answers Success. Pixels are never decoded here.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from pynetdicom import evt
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from triage_node.domain import AssociationEnd, InstanceHeader, utcnow
from triage_node.errors import (
    DatabaseUnavailable,
)
from triage_node.logs import get_logger, log_event
from triage_node.spool import Spool

if TYPE_CHECKING:  # the aggregate is passed in when the handlers are bound
    from triage_node.db.intake import Intake

from triage_node.dicom.status import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    PROCESSING_FAILURE,
    REJECT_REASONS,
    SUCCESS,
    error_comment,
)
from triage_node.dicom.storing import Storer

LOG = get_logger(__name__)

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


def _status(code: int, comment: str | None = None) -> Dataset:
    rsp = Dataset()
    rsp.Status = code
    if comment:
        rsp.ErrorComment = error_comment(comment)
    return rsp


class StorageHandlers:
    """The event handlers of one receiver process, with their collaborators bound in."""

    def __init__(
        self,
        spool: Spool,
        intake: Intake,
        min_free_bytes: int,
        clock: Callable[[], datetime] = utcnow,
        *,
        on_association_end: Callable[[], None] | None = None,
    ) -> None:
        self.intake = intake
        self.clock = clock
        self.storer = Storer(spool, intake, min_free_bytes, clock)
        self.on_association_end = on_association_end  # the study may be complete now
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
        self.opened(
            event.assoc, requestor.ae_title, event.assoc.acceptor.ae_title, str(requestor.address)
        )

    def opened(self, key: object, calling_ae: str, called_ae: str, peer: str) -> int | None:
        """Record an accepted association under *key* (whatever identifies it to the
        transport); its id, or None when the database could not record it."""
        try:
            association_id = self.intake.open_association(
                calling_ae=calling_ae, called_ae=called_ae, peer_address=peer, now=self.clock()
            )
        except DatabaseUnavailable as exc:
            log_event(
                LOG,
                logging.ERROR,
                "association_record_failed",
                "could not record the association",
                error=exc.cause,
            )
            return None
        with self._lock:
            self._association_ids[key] = association_id
        log_event(
            LOG,
            logging.INFO,
            "association_accepted",
            "association accepted",
            association=association_id,
            calling_ae=calling_ae,
            peer=peer,
        )
        return association_id

    def on_closed(self, event: Any) -> None:
        # Its end is recorded once its thread has ended (association_finished): the connection
        # closes while a release is still being completed, before pynetdicom marks it released.
        stop_waiting_for_request(event.assoc)

    def association_finished(self, assoc: Any) -> None:
        """After the association's thread ended, whatever ended it."""
        _remove_partial_dataset(assoc)
        self._record_end(assoc)

    def _record_end(self, assoc: Any) -> None:
        self.ended(assoc, AssociationEnd.RELEASED if assoc.is_released else AssociationEnd.ABORTED)

    def ended(self, key: object, how: AssociationEnd) -> None:
        """Record the end of the association opened under *key* (once; later calls do
        nothing) and ring the settle doorbell."""
        with self._lock:
            association_id = self._association_ids.pop(key, None)
        if association_id is None:
            return
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
        if self.on_association_end is not None:
            self.on_association_end()

    def on_rejected(self, event: Any) -> None:
        requestor = event.assoc.requestor
        sent = event.assoc.acceptor.primitive
        log_rejection(
            requestor.ae_title,
            event.assoc.acceptor.ae_title,
            str(requestor.address),
            getattr(sent, "result_source", None),
            getattr(sent, "diagnostic", None),
        )

    # -- C-STORE -----------------------------------------------------------------------------

    def on_c_store(self, event: Any) -> Dataset:
        """Store one instance durably, then answer (PS3.4 Annex B.2.3)."""
        code, comment = self.stored(
            event.assoc, Path(event.dataset_path), event.request, event.assoc.requestor.ae_title
        )
        return _status(code, comment)

    def stored(
        self,
        key: object,
        partial: Path,
        request: Any,
        calling_ae: str,
        header: InstanceHeader | None = None,
    ) -> tuple[int, str]:
        """Store the dataset a transport received into *partial* (removed afterwards, whatever
        happened) for the association opened under *key*, and log it; the status code and
        comment to answer. *request*: the C-STORE-RQ (its Affected SOP Class and Instance
        UIDs); *header*: the file's header fields where the transport read them already."""
        started = time.perf_counter()
        sop_uid = str(request.AffectedSOPInstanceUID)
        with self._lock:
            association_id = self._association_ids.get(key)
        try:
            code, comment = self._store(partial, request, association_id, header)
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
            calling_ae=calling_ae,
            association=association_id,
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
        return code, comment

    def _store(
        self,
        partial: Path,
        request: Any,
        association_id: int | None,
        header: InstanceHeader | None = None,
    ) -> tuple[int, str]:
        """Store *partial* if it holds what *request* (a C-STORE-RQ: its Affected SOP Class
        and Instance UIDs) announced; the status code and comment to answer. *header*: the
        file's header fields where the receiver read them already."""

        def as_requested(header: InstanceHeader) -> tuple[int, str] | None:
            if header.sop_instance_uid != str(request.AffectedSOPInstanceUID):
                return CANNOT_UNDERSTAND, "SOP Instance UID differs from the C-STORE request"
            if header.sop_class_uid != str(request.AffectedSOPClassUID):
                return DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID differs from the request"
            return None

        stored = self.storer.store(partial, association_id, as_requested, header=header)
        return stored.code, stored.comment


def log_rejection(
    calling_ae: str, called_ae: str, peer: str, source: int | None, diagnostic: int | None
) -> None:
    """Log an A-ASSOCIATE-RJ the node sent: its reason, who asked and from where."""
    reason = REJECT_REASONS.get((source, diagnostic), "see PS3.8 Table 9-21")
    log_event(
        LOG,
        logging.WARNING,
        "association_rejected",
        f"association rejected: {reason}",
        calling_ae=calling_ae,
        called_ae=called_ae,
        peer=peer,
        source=source,
        diagnostic=diagnostic,
    )


def stop_waiting_for_request(assoc: Any) -> None:
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
