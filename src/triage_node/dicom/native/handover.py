"""The receiver process's side of the DCMTK transport (``dicom.transport = "dcmtk"``).

The receiver process keeps accepting and admitting connections itself (``dicom.server``: the
address allow-list, the per-address and total limits, the deadline for a complete
A-ASSOCIATE-RQ). An admitted connection is passed, with one end of a socket pair, to the
process's DCMTK program (``dcmtk_receiver.cpp``) over a Unix socket (SCM_RIGHTS); DCMTK takes
the association over and asks, over the pair, what the node decides: whether to accept it
(the node's AE title rules), and the status of each instance it received into the spool's
incoming directory, which this side stores with the node's ``StorageHandlers`` (the same
checks, fsync, placement, committed rows and logs as the pynetdicom transport). Association
records and the settle doorbell follow the pair's messages. The connection's thread here
serves its pair until the association ends, so the admission slot is held exactly as long.

The DCMTK program is a child of the receiver process and dies with it; if it dies first the
receiver process exits, and the supervisor restarts both.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import subprocess
import threading
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace
from typing import IO

from pydicom.uid import UID
from pynetdicom.pdu import A_ABORT_RQ

from triage_node.config import DicomConfig
from triage_node.dicom.admission import A_ASSOCIATE_RQ_TYPE, drain
from triage_node.dicom.status import error_comment
from triage_node.dicom.storage_scp import StorageHandlers, log_rejection, supported_contexts
from triage_node.domain import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    AssociationEnd,
    InstanceHeader,
)
from triage_node.errors import InvalidUID, TriageError
from triage_node.logs import get_logger, log_event

LOG = get_logger(__name__)

HEADER_FIELDS = tuple(f.name for f in fields(InstanceHeader))  # the order DCMTK sends them in

# The answers to 'Q' (dcmtk_receiver.cpp), and the A-ASSOCIATE-RJ diagnostics they stand for
# (rejected-permanent, service-user; PS3.8 Section 9.3.4).
ACCEPT, CALLED_AE_NOT_RECOGNIZED, CALLING_AE_NOT_RECOGNIZED = 0, 1, 2
_DIAGNOSTIC = {CALLED_AE_NOT_RECOGNIZED: 7, CALLING_AE_NOT_RECOGNIZED: 3}

_START_TIMEOUT = 30.0  # seconds for the program to connect back


def ae_title_verdict(config: DicomConfig, calling_ae: str, called_ae: str) -> int:
    """The node's AE title rules, as its pynetdicom AE applies them (``require_called_aet``,
    ``require_calling_aet``: the called title is checked first)."""
    if config.require_called_ae and called_ae.strip() != config.ae_title:
        return CALLED_AE_NOT_RECOGNIZED
    if config.allowed_calling_aes and calling_ae.strip() not in config.allowed_calling_aes:
        return CALLING_AE_NOT_RECOGNIZED
    return ACCEPT


def receive_exactly(channel: socket.socket, size: int) -> bytes:
    """*size* bytes from *channel*; EOFError when it closes first."""
    data = bytearray()
    while len(data) < size:
        chunk = channel.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return bytes(data)


def _header(values: list[str]) -> InstanceHeader | None:
    """The header fields DCMTK read, or None (the file is then read here, with the node's
    own reading deciding what is wrong with it)."""
    if len(values) != len(HEADER_FIELDS):
        return None
    try:
        return InstanceHeader(
            **{name: value.strip() for name, value in zip(HEADER_FIELDS, values, strict=True)}
        )
    except InvalidUID:
        return None


def _status(code: int, comment: str) -> bytes:
    """The answer to 'S': the status, then the Error Comment's length and its text (ASCII, at
    most 64 characters: ``error_comment``), empty on success."""
    text = error_comment(comment).encode("ascii")
    return struct.pack("<HH", code, len(text)) + text


def serve_association(
    channel: socket.socket, handlers: StorageHandlers, config: DicomConfig, peer: str
) -> None:
    """Answer one association's DCMTK worker until it ends: decide on it, record it, store
    each instance it received, record its end (an association that ends without saying so is
    recorded as aborted)."""
    calling_ae = ""
    try:
        while True:
            try:
                (length,) = struct.unpack("<I", receive_exactly(channel, 4))
                message = receive_exactly(channel, length)
            except (EOFError, OSError, struct.error):
                return  # the worker ended
            kind = message[:1]
            values = message[1:].decode("utf-8", errors="replace").split("\0")[:-1]
            if kind == b"Q" and len(values) == 3:
                calling_ae, called_ae, _ = (value.strip() for value in values)
                verdict = ae_title_verdict(config, calling_ae, called_ae)
                if verdict != ACCEPT:
                    log_rejection(calling_ae, called_ae, peer, 1, _DIAGNOSTIC[verdict])
                channel.sendall(bytes([verdict]))
            elif kind == b"O":
                handlers.opened(channel, calling_ae, config.ae_title, peer)
            elif kind == b"S" and len(values) >= 3:
                part, sop_class, sop_instance, *read = values
                request = SimpleNamespace(
                    AffectedSOPClassUID=sop_class, AffectedSOPInstanceUID=sop_instance
                )
                code, comment = handlers.stored(
                    channel, Path(part), request, calling_ae, _header(read)
                )
                channel.sendall(_status(code, comment))
            elif kind == b"E" and values:
                how = AssociationEnd.RELEASED if values[0] == "RELEASED" else AssociationEnd.ABORTED
                handlers.ended(channel, how)
            else:
                return  # not the protocol: end it (the worker then aborts)
    finally:
        handlers.ended(channel, AssociationEnd.ABORTED)  # nothing once recorded


def _a_abort_unexpected_pdu() -> bytes:
    """A-ABORT from the service provider for an unexpected PDU (PS3.8 Section 9.3.8), as
    pynetdicom's state machine answers a connection that opens with anything but a request."""
    pdu = A_ABORT_RQ()
    pdu.source, pdu.reason_diagnostic = 0x02, 0x02
    return bytes(pdu.encode())


def _starts_with_request(connection: socket.socket) -> bool:
    try:
        first = connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return False
    return first == bytes([A_ASSOCIATE_RQ_TYPE])


def _abort_unexpected(connection: socket.socket, peer: str) -> None:
    """Answer a connection that did not open with an A-ASSOCIATE-RQ and close it (drained
    first, so the close is not a reset that loses the answer)."""
    log_event(
        LOG,
        logging.WARNING,
        "connection_aborted",
        "connection aborted: it did not open with an association request",
        peer=peer,
    )
    with contextlib.suppress(OSError):
        connection.sendall(_a_abort_unexpected_pdu())
    drain(connection)


def _uids(uids: list[UID] | tuple[UID, ...]) -> str:
    return ",".join(str(uid) for uid in uids)


def program_arguments(config: DicomConfig, control_fd: int, incoming: Path) -> list[str]:
    """The program's command line: the node's identity, timeouts, PDU size and the same
    presentation contexts as the pynetdicom transport accepts."""
    contexts = supported_contexts()
    transfer_syntaxes = contexts[0].transfer_syntax  # every context has the same list
    return [
        str(control_fd),
        str(incoming),
        config.ae_title,
        IMPLEMENTATION_CLASS_UID,
        IMPLEMENTATION_VERSION_NAME,
        str(max(1, round(config.acse_timeout))),
        str(max(1, round(config.dimse_timeout))),
        str(max(1, round(config.network_timeout))),
        str(config.max_pdu_size),
        _uids(transfer_syntaxes),
        _uids([cx.abstract_syntax for cx in contexts if cx.abstract_syntax is not None]),
    ]


class DcmtkTransport:
    """A receiver process's DCMTK program: started, handed connections, watched, stopped."""

    def __init__(
        self,
        program: Path,
        config: DicomConfig,
        incoming: Path,
        on_death: Callable[[], None],
    ) -> None:
        self.program = program
        self.config = config
        self.incoming = incoming
        self.on_death = on_death
        self._control: socket.socket | None = None
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._active = 0

    @property
    def active(self) -> int:
        """Associations being served now."""
        with self._lock:
            return self._active

    def start(self) -> None:
        """Start the program and wait until it is ready. Raises TriageError when it cannot
        start."""
        ours, theirs = socket.socketpair()
        command = [
            str(self.program),
            *program_arguments(self.config, theirs.fileno(), self.incoming),
        ]
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=[theirs.fileno()],
        )
        theirs.close()
        ours.settimeout(_START_TIMEOUT)
        try:
            ready = ours.recv(1) == b"R"
        except OSError:
            ready = False
        if not ready:
            ours.close()
            self._process.kill()
            _, errors = self._process.communicate()
            detail = errors.decode(errors="replace").strip().splitlines()[-1:] or ["no answer"]
            raise TriageError(f"the DCMTK receiver did not start: {detail[0]}")
        ours.settimeout(None)
        self._control = ours
        assert self._process.stderr is not None
        threading.Thread(
            target=self._relay_messages, args=(self._process.stderr,), daemon=True
        ).start()
        threading.Thread(target=self._watch, daemon=True, name="dcmtk-watch").start()
        log_event(
            LOG,
            logging.INFO,
            "dcmtk_receiver_started",
            "DCMTK transport ready",
            program_pid=self._process.pid,
        )

    def serve(self, connection: socket.socket, peer: str, handlers: StorageHandlers) -> None:
        """Hand an admitted connection (its A-ASSOCIATE-RQ whole in the socket's buffer) over
        and serve its association until it ends."""
        if not _starts_with_request(connection):
            _abort_unexpected(connection, peer)
            return
        ours, theirs = socket.socketpair()
        try:
            with self._lock:
                if self._control is None:
                    raise OSError("the DCMTK receiver is not running")
                socket.send_fds(self._control, [b"A"], [connection.fileno(), theirs.fileno()])
                self._active += 1
        except OSError as exc:
            ours.close()
            log_event(
                LOG,
                logging.ERROR,
                "dcmtk_handover_failed",
                f"could not hand a connection to the DCMTK receiver: {exc}",
                peer=peer,
            )
            return
        finally:
            theirs.close()
        try:
            with ours:
                serve_association(ours, handlers, self.config, peer)
        finally:
            with self._lock:
                self._active -= 1

    def stop(self, grace: float) -> None:
        """No new associations; those in progress get *grace* seconds, then are cut off."""
        self._stopping.set()
        with self._lock:
            control, self._control = self._control, None
        if control is not None:
            control.close()  # the program takes nothing more, and ends with its last worker
        process = self._process
        if process is None:
            return
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _watch(self) -> None:
        assert self._process is not None
        code = self._process.wait()
        if self._stopping.is_set():
            return
        log_event(
            LOG,
            logging.ERROR,
            "dcmtk_receiver_died",
            "the DCMTK receiver ended unexpectedly; the receiver restarts",
            exitcode=code,
        )
        self.on_death()

    @staticmethod
    def _relay_messages(stream: IO[bytes]) -> None:
        """DCMTK's own error messages (protocol errors, a peer gone) into the node's log."""
        with stream:  # closed at the program's end: the pipe is this thread's to close
            for line in stream:
                text = line.decode(errors="replace").strip()[:300]
                if text:
                    log_event(LOG, logging.WARNING, "dcmtk_message", text)
