"""Doorbells across hosts: what one host rings, the others hear (PostgreSQL only).

:class:`Announcer` is what the node's processes call instead of :func:`doorbell.ring` for the
topics another host may act on — ``jobs`` (a study was queued: a ``triage-node worker`` host
claims it) and ``outbox`` (a worker on another host stored results: the serving host delivers
them). It rings this host's doorbells and, on PostgreSQL, sends a ``NOTIFY``.

:class:`Relay` is one thread per host (in the supervisor of ``serve`` and of ``worker``): it
holds the listening connection and rings this host's doorbells for every topic announced by
another origin (this host's own announcements were rung locally already). When the database
goes away it logs once, waits and listens again; the sweeps cover what it missed.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from triage_node.db.notify import Notifier, parse
from triage_node.errors import DatabaseUnavailable
from triage_node.logs import RepeatedFailure
from triage_node.service.doorbell import JOBS, OUTBOX, origin, ring

LOG = logging.getLogger("triage_node.relay")
TOPICS = frozenset({JOBS, OUTBOX})  # the topics another host may act on
WAIT_SECONDS = 0.5  # how soon the relay notices that it is to stop
RECONNECT_SECONDS = 5.0


class Announcer:
    """Rings *topic* on this host and, on PostgreSQL, on every other host."""

    def __init__(self, doorbells: Path, notifier: Notifier) -> None:
        self.doorbells = doorbells
        self.notifier = notifier
        self.origin = origin(doorbells)
        self._failures = RepeatedFailure(LOG, "notify_failed")

    def __call__(self, topic: str) -> None:
        ring(self.doorbells, topic)
        if not self.notifier.enabled or topic not in TOPICS:
            return
        try:
            self.notifier.notify(topic, self.origin)
        except DatabaseUnavailable as exc:  # other hosts find the work at their next sweep
            self._failures.failed(logging.WARNING, "cross-host wake-up not sent", error=str(exc))
        else:
            self._failures.succeeded()


class Relay:
    """Rings this host's doorbells for topics announced on other hosts."""

    def __init__(self, doorbells: Path, notifier: Notifier) -> None:
        self.doorbells = doorbells
        self.notifier = notifier
        self.origin = origin(doorbells)
        self.relayed = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = RepeatedFailure(LOG, "listen_failed")

    def start(self) -> Relay:
        if self.notifier.enabled:
            self._thread = threading.Thread(target=self._run, name="relay", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(RECONNECT_SECONDS + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self.notifier.listen() as listening:
                    self._failures.succeeded()
                    while not self._stop.is_set():
                        for payload in listening.received(WAIT_SECONDS):
                            self._relay(payload)
            except DatabaseUnavailable as exc:
                self._failures.failed(
                    logging.WARNING, "not listening for other hosts' wake-ups", error=str(exc)
                )
                self._stop.wait(RECONNECT_SECONDS)

    def _relay(self, payload: str) -> None:
        topic, sender = parse(payload)
        if topic in TOPICS and sender != self.origin:
            self.relayed += 1
            ring(self.doorbells, topic)
