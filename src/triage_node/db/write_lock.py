"""One writer at a time on an SQLite file, handed over within a millisecond.

SQLite lets one connection write at a time; the others get SQLITE_BUSY and its busy handler
retries after sleeping 1, 2, 5, 10 ... 100 ms. With several receiver processes committing an
instance row each every few milliseconds, those sleeps are most of the time a row waits (four
senders into two receivers: fewer instances per second than one sender). Here each write
transaction first takes an exclusive ``flock`` on a file beside the database (threads of one
process queue on an in-process lock first); a writer that finds it taken tries again within a
millisecond, and after the database's busy timeout goes on without it, to SQLite's own
locking (whose error, if it gives one, names what is really in the way). Read transactions
take neither this lock nor SQLite's write lock (``BEGIN DEFERRED``: in WAL mode readers and
writers never wait for each other), so the holder of this lock waits for no one but a writer
from outside the node (a ``sqlite3`` shell), whom SQLite's own locking still keeps safe.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SUFFIX = "-writelock"
FIRST_RETRY = 0.0002  # seconds before a writer that found the lock taken tries again,
LONGEST_RETRY = 0.001  # doubling up to this


class WriteLock:
    """The write lock of one SQLite database file (a process keeps one per file)."""

    def __init__(self, database: Path, timeout: float = 30.0) -> None:
        self.path = database.with_name(database.name + SUFFIX)
        self.timeout = timeout  # the database's busy timeout
        self._threads = threading.Lock()
        self._held = threading.local()
        self._fd: int | None = None
        self._fd_pid = 0

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold the lock for a write transaction; a thread that already holds it goes on.

        A writer that cannot have it within the database's busy timeout goes on without it:
        the lock only orders the node's writers, and SQLite's own locking, which then decides,
        says what is really in the way (a holder stuck on a lock from outside the node)."""
        if getattr(self._held, "depth", 0):
            self._held.depth += 1
            try:
                yield
            finally:
                self._held.depth -= 1
            return
        deadline = time.monotonic() + self.timeout
        threads = self._threads.acquire(timeout=self.timeout)
        fd: int | None = None
        try:
            if threads:
                fd = self._file()
                if not self._take(fd, deadline):
                    fd = None  # go on without it (above)
            self._held.depth = 0 if fd is None else 1
            try:
                yield
            finally:
                self._held.depth = 0
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            if threads:
                self._threads.release()

    @staticmethod
    def _take(fd: int, deadline: float) -> bool:
        """Take the lock file's flock; False once *deadline* has passed without it."""
        pause = FIRST_RETRY
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(pause)
                pause = min(2 * pause, LONGEST_RETRY)

    def _file(self) -> int:
        """This process's descriptor of the lock file (a forked child opens its own: a shared
        descriptor would share the lock)."""
        if self._fd is None or self._fd_pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._fd_pid = os.getpid()
        return self._fd


_locks: dict[Path, WriteLock] = {}
_locks_guard = threading.Lock()


def write_lock(database: str, timeout: float | None = None) -> WriteLock:
    """The one :class:`WriteLock` of this process for the SQLite file *database* (*timeout*:
    the database's busy timeout, set by the engine that opens it)."""
    path = Path(database).resolve()
    with _locks_guard:
        lock = _locks.get(path)
        if lock is None:
            lock = _locks[path] = WriteLock(path)
        if timeout is not None:
            lock.timeout = timeout
        return lock
