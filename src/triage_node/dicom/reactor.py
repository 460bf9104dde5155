"""pynetdicom's reactors, quiet when an association is idle.

Every association runs two threads — the DUL's, which watches the socket, and the
association's, which serves requests — and pynetdicom 3 has both poll every millisecond
(``time.sleep(0.001)`` in ``dul.py`` and ``association.py``): for one idle association that is
two thousand wake-ups a second, for sixty a seventh of a core doing nothing. Here, once an
association has had no traffic for :data:`IDLE_AFTER` seconds, both of its threads sleep
:data:`IDLE_SLEEP` between their checks, and :data:`LONG_IDLE_SLEEP` once it has been quiet for
:data:`LONG_IDLE_AFTER`; the first PDU after a quiet spell is picked up at most two such sleeps
later, and the association is back to millisecond polling from then on. Nothing else
in pynetdicom changes: the two modules' ``time`` is replaced by :class:`QuietTime`, which
forwards everything to :mod:`time` and lengthens only those polling sleeps.
"""

from __future__ import annotations

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
POLL = 0.001  # pynetdicom's own polling sleep


def idle_seconds(dul: Any) -> float:
    """Seconds since the DUL last received anything (its network-timeout timer's start)."""
    started = getattr(getattr(dul, "_idle_timer", None), "_start_time", None)
    return 0.0 if started is None else max(0.0, time.time() - started)


def polling_sleep(thread: threading.Thread, seconds: float) -> float:
    """How long a pynetdicom thread should sleep when it asks for *seconds*."""
    if seconds > POLL:
        return seconds
    if isinstance(thread, Association):
        dul: Any = thread.dul
    elif isinstance(thread, DULServiceProvider):
        dul = thread
    else:
        return seconds
    idle = idle_seconds(dul)
    if idle > LONG_IDLE_AFTER:
        return LONG_IDLE_SLEEP
    return IDLE_SLEEP if idle > IDLE_AFTER else seconds


class QuietTime:
    """Stands in for :mod:`time` inside pynetdicom's ``dul`` and ``association`` modules."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(polling_sleep(threading.current_thread(), seconds))


def quiet_idle_associations() -> None:
    """Apply :class:`QuietTime` to this process's pynetdicom (receiver processes call it)."""
    quiet = QuietTime()
    pynetdicom.association.time = quiet  # type: ignore[assignment,attr-defined]
    pynetdicom.dul.time = quiet  # type: ignore[assignment,attr-defined]
