"""Wake-ups between the node's own processes on one host, so work moves on when something
happens rather than when a poll comes round.

A listener binds a Unix datagram socket in Linux's abstract namespace (no file, no path-length
limit; the name holds a digest of the data directory, the topic and the pid) and leaves a marker
file ``DATA_DIR/run/<topic>/<pid>``; :func:`ring` sends one byte to the socket of every marker
(a listener that is gone or full is skipped: a ring is a hint, never the only way work is
found — every listener still sweeps at a long interval). Topics:

- ``studies``: an association ended (receivers ring; the scheduler arms the study's settle timer);
- ``jobs``: a study was queued (the scheduler rings; an idle worker claims at once);
- ``outbox``: results are in the outbox (workers ring; the scheduler delivers at once).

Processes on other hosts sharing a PostgreSQL database are woken by ``service/relay``
(``LISTEN``/``NOTIFY``), which rings the doorbells of its own host.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import socket
from pathlib import Path

STUDIES, JOBS, OUTBOX = "studies", "jobs", "outbox"


def run_dir(data_dir: Path) -> Path:
    return data_dir / "run"


def _digest(directory: Path) -> str:
    return hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]


def _address(directory: Path, topic: str, pid: str) -> bytes:
    return f"\0triage-node/{_digest(directory)}/{topic}/{pid}".encode()


def origin(directory: Path) -> str:
    """The name of the processes that share *directory*'s doorbells: host and directory."""
    return f"{socket.gethostname()}/{_digest(directory)}"


def ring(directory: Path, topic: str) -> None:
    """Wake every listener of *topic*; never blocks, never fails."""
    try:
        pids = [entry.name for entry in (directory / topic).iterdir() if entry.name.isdigit()]
    except OSError:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.setblocking(False)
        for pid in pids:
            with contextlib.suppress(OSError):  # full (it wakes anyway), or its process is gone
                sender.sendto(b"!", _address(directory, topic, pid))


class Doorbell:
    """This process's listener for one topic."""

    def __init__(self, directory: Path, topic: str) -> None:
        folder = directory / topic
        folder.mkdir(parents=True, exist_ok=True)
        pid = str(os.getpid())
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(_address(directory, topic, pid))
        self._socket.setblocking(False)
        self.path = folder / pid  # the marker ring() finds it by
        self.path.touch()

    def wait(self, timeout: float) -> bool:
        """True when rung within *timeout* seconds (every ring since the last wait counts once)."""
        readable, _, _ = select.select([self._socket], [], [], max(0.0, timeout))
        if not readable:
            return False
        with contextlib.suppress(BlockingIOError):
            while self._socket.recv(64):
                pass
        return True

    def close(self) -> None:
        self._socket.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> Doorbell:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
