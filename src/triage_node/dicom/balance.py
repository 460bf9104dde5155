"""Spreading connections over the receiver processes that share the DICOM port.

Every receiver accepts from the one listening socket, so the kernel wakes them all and the
first to call ``accept`` wins: when four senders connect at once, one process can end up with
three associations while the other has one, and the busy one's interpreter (one core) then sets
the pace for three senders. Here the receivers share a count of their open connections (a small
array in shared memory made by the supervisor, one integer each, written only by its owner); a
receiver with more open connections than the least busy one waits a millisecond per connection
it is ahead (at most :data:`LONGEST_DEFERRAL`) before it accepts, so an idler receiver takes the
connection first. Receivers as busy as each other accept at once, so a flood of connections is
accepted as fast as before, and a connection waits a few milliseconds at most.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Protocol

DEFERRAL_PER_CONNECTION = 0.001  # seconds a receiver waits per connection it is ahead
LONGEST_DEFERRAL = 0.003


class Counts(Protocol):
    """Integers by receiver index (a ``multiprocessing`` RawArray, or a list)."""

    def __getitem__(self, index: int, /) -> int: ...
    def __setitem__(self, index: int, value: int, /) -> None: ...
    def __iter__(self) -> Iterator[int]: ...


class AcceptBalance:
    """This receiver's entry in the shared counts (*counts*: one integer per receiver)."""

    def __init__(self, counts: Counts, index: int) -> None:
        self._counts = counts
        self._index = index
        self._lock = threading.Lock()  # the accept thread opens, connection threads close
        counts[index] = 0  # a restarted receiver's connections died with its predecessor

    @classmethod
    def alone(cls) -> AcceptBalance:
        """For a receiver that shares its port with no other."""
        return cls([0], 0)

    def opened(self) -> None:
        with self._lock:
            self._counts[self._index] += 1

    def closed(self) -> None:
        with self._lock:
            self._counts[self._index] = max(0, self._counts[self._index] - 1)

    def deferral(self) -> float:
        """Seconds to wait before accepting: how far this receiver is ahead of the least busy."""
        ahead = self._counts[self._index] - min(self._counts)
        return min(ahead * DEFERRAL_PER_CONNECTION, LONGEST_DEFERRAL)
