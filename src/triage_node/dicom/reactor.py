"""pynetdicom's reactors, woken by traffic instead of polling.

Every association runs two threads — the DUL's, which watches the socket, and the
association's, which serves requests — and pynetdicom 3 has both poll every millisecond
(``time.sleep(0.001)`` in ``dul.py`` and ``association.py``). That costs twice over: an idle
association makes two thousand wake-ups a second (for sixty, a seventh of a core doing
nothing), and a busy one answers late, since every hand-over between the two threads (a PDU
read, a decoded message, a response to send) waits for the other's next tick — a millisecond
or more each, several per C-STORE.

Here each acceptor gets two doorbells before it starts (:func:`ring_on_traffic`): its queues
ring them when something is put on them. The DUL thread's polling sleep becomes a ``select``
on its socket and its doorbell (a byte on a socket pair, rung by the queues the association
thread and the DIMSE provider feed); the association thread's becomes a wait on a
:class:`threading.Event` rung by the queues the DUL feeds (decoded DIMSE messages, ACSE
primitives). Both wake at once when there is work and stay asleep when there is none. The
wait is still bounded — :data:`BUSY_WAIT`, then :data:`IDLE_WAIT` once nothing has arrived
for :data:`IDLE_AFTER` and :data:`LONG_IDLE_WAIT` after :data:`LONG_IDLE_AFTER` — for what
rings no bell: pynetdicom's timers (ARTIM, network timeout: checked to within a second), a
killed thread, a dead peer thread. Threads without doorbells (an association made before
:func:`ring_on_traffic`, or as a requestor) keep the older behaviour: pynetdicom's polling,
lengthened while idle.

Nothing else in pynetdicom changes: the two modules' ``time`` is replaced by
:class:`QuietTime`, which forwards everything to :mod:`time` and turns only those polling
sleeps into waits.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import ssl
import threading
import time
from typing import Any

import pynetdicom.association
import pynetdicom.dul
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

IDLE_AFTER = 0.5  # seconds without a PDU before an association counts as idle
IDLE_SLEEP = 0.02  # seconds between the checks of an idle association's threads
LONG_IDLE_AFTER = 5.0  # ... and after this long without a PDU
LONG_IDLE_SLEEP = 0.2
BUSY_WAIT = 0.02  # the longest a thread with a doorbell waits while busy,
IDLE_WAIT = 0.2  # ... once idle (IDLE_AFTER)
LONG_IDLE_WAIT = 1.0  # ... and once long idle (LONG_IDLE_AFTER): only timers ring no bell
POLL = 0.001  # pynetdicom's own polling sleep


class Doorbell:
    """Wakes a DUL thread waiting in ``select``: a byte on a socket pair.

    Rings from the DUL thread itself are dropped (it is awake: it checks its queues before it
    waits again), so a byte is sent only when another thread hands it something.
    """

    def __init__(self, owner: threading.Thread) -> None:
        self._owner = owner
        self._receive, self._send = socket.socketpair()
        self._receive.setblocking(False)
        self._send.setblocking(False)

    def fileno(self) -> int:
        return self._receive.fileno()

    def ring(self) -> None:
        if threading.current_thread() is self._owner:
            return
        with contextlib.suppress(OSError):  # full (rung many times already) or closed
            self._send.send(b"\0")

    def drain(self) -> None:
        with contextlib.suppress(OSError):
            while self._receive.recv(4096):
                pass

    def close(self) -> None:
        self._receive.close()
        self._send.close()


class RingingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that calls *ring* after each put (the waiting thread then finds the item)."""

    def __init__(self, ring: Any) -> None:
        super().__init__()
        self._ring = ring

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._ring()


def ring_on_traffic(assoc: Association) -> None:
    """Give an acceptor not yet started its doorbells.

    The association thread is rung by what the DUL hands up (``to_user_queue``: ACSE
    primitives, and ``dimse.msg_queue``: complete DIMSE messages); the DUL thread by what it is
    handed (``to_provider_queue``: PDUs to send, ``event_queue``: state-machine events). What
    the queues already hold (the socket's "connection indication" event) moves across.
    """
    dul = assoc.dul
    assoc_bell = threading.Event()
    dul_bell = Doorbell(owner=dul)
    assoc.dimse.msg_queue = _ringing(assoc.dimse.msg_queue, assoc_bell.set)
    dul.to_user_queue = _ringing(dul.to_user_queue, assoc_bell.set)
    dul.to_provider_queue = _ringing(dul.to_provider_queue, dul_bell.ring)
    dul.event_queue = _ringing(dul.event_queue, dul_bell.ring)
    assoc._triage_bell = assoc_bell  # type: ignore[attr-defined]
    dul._triage_bell = dul_bell  # type: ignore[attr-defined]


def _ringing(old: queue.Queue[Any], ring: Any) -> RingingQueue:
    new = RingingQueue(ring)
    while True:
        try:
            new.put(old.get_nowait())
        except queue.Empty:
            return new


def close_doorbells(assoc: Association) -> None:
    """Release the DUL doorbell's sockets once the association's threads have ended."""
    bell = getattr(assoc.dul, "_triage_bell", None)
    if isinstance(bell, Doorbell):
        bell.close()


def idle_seconds(dul: Any) -> float:
    """Seconds since the DUL last received anything (its network-timeout timer's start)."""
    started = getattr(getattr(dul, "_idle_timer", None), "_start_time", None)
    return 0.0 if started is None else max(0.0, time.time() - started)


def _dul_of(thread: threading.Thread) -> Any:
    if isinstance(thread, Association):
        return thread.dul
    if isinstance(thread, DULServiceProvider):
        return thread
    return None


def polling_sleep(thread: threading.Thread, seconds: float) -> float:
    """How long a pynetdicom thread without a doorbell should sleep when it asks for
    *seconds*: pynetdicom's own tick while busy, longer while idle."""
    if seconds > POLL:
        return seconds
    dul = _dul_of(thread)
    if dul is None:
        return seconds
    return _by_idleness(dul, seconds, IDLE_SLEEP, LONG_IDLE_SLEEP)


def longest_wait(dul: Any) -> float:
    """The bound on a wait of a thread with a doorbell: short while busy, long while idle."""
    return _by_idleness(dul, BUSY_WAIT, IDLE_WAIT, LONG_IDLE_WAIT)


def _by_idleness(dul: Any, busy: float, idle: float, long_idle: float) -> float:
    quiet = idle_seconds(dul)
    if quiet > LONG_IDLE_AFTER:
        return long_idle
    return idle if quiet > IDLE_AFTER else busy


def _wait_for_socket(dul: Any, bell: Doorbell, timeout: float) -> None:
    """The DUL thread's wait: until its socket is readable or its doorbell rings."""
    sock = getattr(getattr(dul, "socket", None), "socket", None)
    watched: list[Any] = [bell]
    if sock is not None:
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes already buffered: nothing for select to see
        watched.append(sock)
    try:
        ready, _, _ = select.select(watched, [], [], timeout)
    except (OSError, ValueError):  # a socket closed under us: let pynetdicom find out
        time.sleep(timeout)  # (a closed doorbell must not turn the wait into a spin)
        return
    if bell in ready:
        bell.drain()


def wait_for_work(thread: threading.Thread, seconds: float) -> bool:
    """Wait as *thread* (a pynetdicom reactor asking to sleep *seconds*) should; False when it
    has no doorbell and must sleep instead."""
    if seconds > POLL:
        return False
    if isinstance(thread, Association):
        bell = getattr(thread, "_triage_bell", None)
        if not isinstance(bell, threading.Event):
            return False
        bell.wait(longest_wait(thread.dul))
        bell.clear()  # what rang is on a queue the reactor checks next
        return True
    if isinstance(thread, DULServiceProvider):
        dul_bell = getattr(thread, "_triage_bell", None)
        if not isinstance(dul_bell, Doorbell):
            return False
        _wait_for_socket(thread, dul_bell, longest_wait(thread))
        return True
    return False


class QuietTime:
    """Stands in for :mod:`time` inside pynetdicom's ``dul`` and ``association`` modules."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        thread = threading.current_thread()
        if not wait_for_work(thread, seconds):
            time.sleep(polling_sleep(thread, seconds))


def quiet_idle_associations() -> None:
    """Apply :class:`QuietTime` to this process's pynetdicom (receiver processes call it)."""
    quiet = QuietTime()
    pynetdicom.association.time = quiet  # type: ignore[assignment,attr-defined]
    pynetdicom.dul.time = quiet  # type: ignore[assignment,attr-defined]
