"""One writer at a time on an SQLite file, handed over at once instead of polled for.

SQLite lets one connection write at a time; the others get SQLITE_BUSY and its busy handler
retries after sleeping 1, 2, 5, 10 ... 100 ms. With several receiver processes committing an
instance row each every few milliseconds, those sleeps are most of the time a row waits (four
senders into two receivers: fewer instances per second than one sender). Here each write
transaction first takes an exclusive ``flock`` on a file beside the database, which the kernel
hands to the next waiting process (or thread, through an in-process lock) the moment the last
writer releases it, right after its commit. SQLite's own locking and busy timeout stay as they
are: this only orders the node's writers, so a process that does not take the lock (a
``sqlite3`` shell) is still safe, just slower to get in.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SUFFIX = "-writelock"


class WriteLock:
    """The write lock of one SQLite database file (a process keeps one per file)."""

    def __init__(self, database: Path) -> None:
        self.path = database.with_name(database.name + SUFFIX)
        self._threads = threading.Lock()
        self._held = threading.local()
        self._fd: int | None = None
        self._fd_pid = 0

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold the lock for a write transaction; a thread that already holds it goes on."""
        if getattr(self._held, "depth", 0):
            self._held.depth += 1
            try:
                yield
            finally:
                self._held.depth -= 1
            return
        with self._threads:
            fd = self._file()
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._held.depth = 1
            try:
                yield
            finally:
                self._held.depth = 0
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _file(self) -> int:
        """This process's descriptor of the lock file (a forked child opens its own: a shared
        descriptor would share the lock)."""
        if self._fd is None or self._fd_pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._fd_pid = os.getpid()
        return self._fd


_locks: dict[Path, WriteLock] = {}
_locks_guard = threading.Lock()


def write_lock(database: str) -> WriteLock:
    """The one :class:`WriteLock` of this process for the SQLite file *database*."""
    path = Path(database).resolve()
    with _locks_guard:
        lock = _locks.get(path)
        if lock is None:
            lock = _locks[path] = WriteLock(path)
        return lock
