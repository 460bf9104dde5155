"""Who gets a connection slot, decided when the connection is accepted — before any thread,
association or slot exists — and how long a peer has to ask for an association.

A peer that connects and then sends a few bytes, or nothing, must not hold the PACS's slots: the
limits here are counted per receiver process at accept time (per source address and in all,
with slots kept for the reserved networks: the PACS always gets in), connections over a limit
are answered with A-ASSOCIATE-RJ (rejected-transient, local limit exceeded; PS3.8 Table 9-21)
by one small rejector thread, and a connection that has not delivered a complete
A-ASSOCIATE-RQ within ``request_timeout`` of being accepted is closed, however its bytes trickle
in (the kernel counts the bytes: ``SO_RCVLOWAT``; nothing polls).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import select
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

from pynetdicom.pdu import A_ASSOCIATE_RJ

from triage_node.logs import get_logger, log_event
from triage_node.networks import IPNetwork, source_ip

LOG = get_logger(__name__)

A_ASSOCIATE_RQ_TYPE = 0x01
PDU_HEADER = 6  # type, reserved, 4-byte length (PS3.8 9.3.1)
# The kernel is asked to wait for this much of a request at most: an A-ASSOCIATE-RQ is a few
# hundred bytes to a few KiB (more presentation contexts, more bytes); above this the peer has
# shown it is really sending, and pynetdicom's own timeouts take over.
LARGEST_AWAITED_REQUEST = 64 * 1024
# rejected-transient (2), DICOM UL service-provider presentation related (3), local limit
# exceeded (2): what pynetdicom answers when its association limit is reached.
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)
REJECTOR_WAIT_SECONDS = 1.0  # a rejected peer's request is awaited this long, then it is closed
REJECTOR_BACKLOG = 256  # rejected connections waiting at once; beyond, they are closed at once


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """The limits of one receiver process (``[dicom]`` settings)."""

    per_address: int  # concurrent connections from one source address
    total: int  # concurrent connections in all (max_associations)
    reserved_networks: tuple[IPNetwork, ...] = ()
    reserved: int = 0  # of *total*, the slots only reserved networks may use
    request_timeout: float = 5.0  # seconds from accept to a complete A-ASSOCIATE-RQ


@dataclass
class Admission:
    """Connection counts of one receiver process. Thread-safe: the accept loop admits, each
    connection's thread releases its slot when it ends."""

    limits: AdmissionLimits
    _by_address: collections.Counter[str] = field(default_factory=collections.Counter)
    _open: int = 0
    _unreserved_open: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def reserved(self, address: str) -> bool:
        ip = source_ip(address)
        return ip is not None and any(ip in n for n in self.limits.reserved_networks)

    def admit(self, address: str) -> str | None:
        """Take a slot for a connection from *address*; the reason when there is none."""
        reserved = self.reserved(address)
        limits = self.limits
        unreserved_slots = limits.total - (limits.reserved if limits.reserved_networks else 0)
        with self._lock:
            if self._open >= limits.total:
                return f"all {limits.total} connection slots in use"
            if not reserved:
                if self._by_address[address] >= limits.per_address:
                    return f"{limits.per_address} connections from this address already"
                if self._unreserved_open >= unreserved_slots:
                    return f"the other {limits.reserved} slots are reserved"
                self._unreserved_open += 1
            self._by_address[address] += 1
            self._open += 1
        return None

    def release(self, address: str) -> None:
        reserved = self.reserved(address)
        with self._lock:
            self._open -= 1
            if not reserved:
                self._unreserved_open -= 1
            self._by_address[address] -= 1
            if self._by_address[address] <= 0:
                del self._by_address[address]

    @property
    def open(self) -> int:
        return self._open


def _wait_for_bytes(sock: socket.socket, count: int, deadline: float) -> bool:
    """True once *count* bytes are waiting unread; False at *deadline* or when the peer closed.
    The kernel holds the wake-up back until then (``SO_RCVLOWAT``), so a trickle costs nothing."""
    count = min(count, LARGEST_AWAITED_REQUEST)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, count)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            readable, _, _ = select.select([sock], [], [], remaining)
            if not readable:
                return False
            waiting = sock.recv(count, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            # Readable with fewer bytes than asked for means the peer closed (or reset).
            return len(waiting) >= count
    except (BlockingIOError, InterruptedError):
        return False
    finally:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


NO_REQUEST = "no association request"


def peer_gone(sock: socket.socket) -> bool:
    """True when the peer closed (or reset) the connection before sending anything — a load
    balancer's health check or a port scan, by the time it is accepted. Such a connection is
    closed at once, without a slot: otherwise a burst of them could fill the slots until each
    one's thread had seen the close, and turn the PACS away meanwhile."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False  # open, nothing sent yet
    except OSError:
        return True  # reset


def await_request_start(sock: socket.socket, timeout: float) -> str | None:
    """Wait for the peer's first bytes (on the TLS port: its handshake); the reason if none."""
    try:
        if _wait_for_bytes(sock, 1, time.monotonic() + timeout):
            return None
    except OSError:
        return "connection lost"
    return NO_REQUEST


def await_request(sock: socket.socket, timeout: float) -> str | None:
    """Wait, at most *timeout* seconds in all, until the peer's first PDU is complete in the
    socket's buffer (read by pynetdicom afterwards); the reason when it is not."""
    deadline = time.monotonic() + timeout
    try:
        if not _wait_for_bytes(sock, PDU_HEADER, deadline):
            return NO_REQUEST
        header = sock.recv(PDU_HEADER, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        if header[0] != A_ASSOCIATE_RQ_TYPE:
            return None  # not a request: pynetdicom's state machine answers it (A-ABORT)
        length = int.from_bytes(header[2:6], "big")
        if not _wait_for_bytes(sock, PDU_HEADER + length, deadline):
            return "incomplete association request"
    except OSError:
        return "connection lost"
    return None


class Rejector:
    """One thread that answers refused connections with A-ASSOCIATE-RJ: it waits briefly for the
    peer's request (answering before it would make the peer's own close a reset that can lose
    the answer), sends the rejection and closes. Never blocks the accept loop."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._pending: collections.OrderedDict[socket.socket, float] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="rejector", daemon=True)
        self._thread.start()

    def reject(self, sock: socket.socket) -> None:
        with self._lock:
            if self._stopped:
                _close(sock)
                return
            if len(self._pending) >= REJECTOR_BACKLOG:  # a flood: the oldest goes unanswered
                oldest, _ = self._pending.popitem(last=False)
                self._selector.unregister(oldest)
                _close(oldest)
            sock.setblocking(False)
            self._pending[sock] = time.monotonic() + REJECTOR_WAIT_SECONDS
            self._selector.register(sock, selectors.EVENT_READ)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(5)
        if not self._thread.is_alive():
            self._selector.close()
            _close(self._wake_r)
            _close(self._wake_w)

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopped:
                    for sock in self._pending:
                        _close(sock)
                    self._pending.clear()
                    return
                deadline = min(self._pending.values(), default=None)
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            for key, _ in self._selector.select(timeout):
                if key.fileobj is self._wake_r:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    continue
                self._answer(key.fileobj)  # type: ignore[arg-type]
            now = time.monotonic()
            with self._lock:
                late = [s for s, until in self._pending.items() if until <= now]
            for sock in late:
                self._answer(sock)

    def _answer(self, sock: socket.socket) -> None:
        with self._lock:
            if self._pending.pop(sock, None) is None:
                return
            self._selector.unregister(sock)
        pdu = A_ASSOCIATE_RJ()
        pdu.result, pdu.source, pdu.reason_diagnostic = REJECT_LOCAL_LIMIT
        drain(sock)
        with contextlib.suppress(OSError):
            sock.send(pdu.encode())
        _close(sock)


def drain(sock: socket.socket) -> None:
    """Read what the peer sent and nobody will: closing with unread bytes resets the connection
    (RST), which can destroy an answer still on its way; closing after this is a plain FIN."""
    with contextlib.suppress(OSError):
        for _ in range(16):  # a peer that keeps sending is not read for ever
            if not sock.recv(LARGEST_AWAITED_REQUEST, socket.MSG_DONTWAIT):
                break


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


class RefusalLog:
    """Refused connections logged without flooding the log: the first of each reason at once,
    then at most one line a minute per reason with how many were refused meanwhile."""

    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._since: collections.Counter[str] = collections.Counter()

    def refused(self, reason: str, peer: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._since[reason] += 1
            last = self._last.get(reason)
            if last is not None and now - last < self.every:
                return
            count, self._since[reason] = self._since[reason], 0
            self._last[reason] = now
        log_event(
            LOG,
            logging.WARNING,
            "connection_refused",
            f"connection refused: {reason}",
            peer=peer,
            refused=count,
        )
