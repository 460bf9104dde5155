"""The spool: received datasets as files, made durable before anything is acknowledged.

Layout: ``<root>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``; every UID is validated before it
becomes part of a path, so a crafted UID cannot leave the spool. Incoming data is streamed by the
receiver into ``<root>/incoming/<host>-<pid>/`` (same file system, so the final step is a rename),
then fsynced, renamed into place and the directory fsynced. A receiver records the instance's
database row while a flusher thread does that (:meth:`Spool.commit_and_record`): the flushes
and the row's statements overlap, and all have finished before anything is acknowledged.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import errno
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

from triage_node.domain import InstanceHeader, SpooledFile, validate_uid
from triage_node.errors import NotPlaced, OutOfResources

R = TypeVar("R")
FLUSH_THREADS = 8  # files being placed at once, per process (one per busy association)

INCOMING = "incoming"
RESULTS = "results"  # the objects the node made, per study; never a UID, so never a study


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """True if a process with this PID runs on this host (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill()
    return stat.rpartition(")")[2].split()[0] != "Z"


SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback, do not wait


def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]

    def start_writeback(fd: int, offset: int, length: int) -> None:
        function(fd, offset, length, SYNC_FILE_RANGE_WRITE)

    return start_writeback


_START_WRITEBACK = _load_sync_file_range()
WRITEBACK_EVERY = 1 << 20  # bytes received between two requests to start writeback


class ReceivedFile:
    """A dataset file being received, which asks the kernel to start writing it to disk every
    :data:`WRITEBACK_EVERY` bytes, so the fsync that must precede a success status only waits
    for the last megabyte of a large radiograph.

    The request (Linux ``sync_file_range``) is made by the thread that writes, at its flush,
    and never waits for the disk; a file smaller than one step (a small instance) makes none,
    and where ``sync_file_range`` is missing the final fsync does all the work. It stands in
    for the ``NamedTemporaryFile`` pynetdicom streams a C-STORE's dataset to
    (:func:`received_file`): ``name``, ``write``, ``file.flush()`` and ``close``.
    """

    def __init__(self, directory: Path, suffix: str = "") -> None:
        fd, name = tempfile.mkstemp(suffix=suffix, dir=directory)
        self.name = name
        self._file = os.fdopen(fd, "wb")
        self._written = 0
        self._started = 0  # bytes whose writeback has been asked for

    @property
    def file(self) -> ReceivedFile:
        return self  # pynetdicom flushes ``file``, tempfile's underlying file object

    def write(self, data: bytes) -> int:
        written = self._file.write(data)
        self._written += written
        return written

    def flush(self) -> None:
        self._file.flush()
        pending = self._written - self._started
        if pending >= WRITEBACK_EVERY and _START_WRITEBACK is not None:
            _START_WRITEBACK(self._file.fileno(), self._started, pending)
            self._started = self._written

    def close(self) -> None:
        self._file.close()

    @property
    def closed(self) -> bool:
        return self._file.closed


def received_file(directory: Path) -> Callable[..., ReceivedFile]:
    """What pynetdicom calls instead of ``NamedTemporaryFile(delete=False, mode="wb",
    suffix=".dcm")``: a :class:`ReceivedFile` in *directory*."""

    def make(*, delete: bool = False, mode: str = "wb", suffix: str = "") -> ReceivedFile:
        if delete or mode != "wb":
            raise ValueError(f"a received dataset is written once (mode {mode!r}, delete {delete})")
        return ReceivedFile(directory, suffix)

    return make


class Spool:
    """A spool directory. Safe to share between processes and hosts (each has its own incoming)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._flusher_lock = threading.Lock()
        self._flusher_pool: concurrent.futures.ThreadPoolExecutor | None = None

    def prepare(self) -> None:
        """Create the spool with owner-only permissions."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.root / INCOMING).mkdir(exist_ok=True, mode=0o700)

    def incoming_dir(self, pid: int | None = None) -> Path:
        """This process's directory for partial files (created on demand)."""
        path = self.root / INCOMING / f"{socket.gethostname()}-{pid or os.getpid()}"
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path

    def purge_stale_incoming(self) -> int:
        """Remove partial files left by dead processes of this host; return how many."""
        removed = 0
        host = socket.gethostname()
        base = self.root / INCOMING
        if not base.is_dir():
            return 0
        for entry in base.iterdir():
            name, _, pid = entry.name.rpartition("-")
            if name != host or not pid.isdigit() or pid_alive(int(pid)):
                continue
            removed += sum(1 for p in entry.iterdir() if p.is_file())
            shutil.rmtree(entry, ignore_errors=True)
        return removed

    @staticmethod
    def relpath_for(header: InstanceHeader) -> str:
        """The spool-relative path of an instance; raises InvalidUID for an unsafe UID."""
        parts = (
            validate_uid(header.study_uid, "Study Instance UID"),
            validate_uid(header.series_uid, "Series Instance UID"),
            validate_uid(header.sop_instance_uid, "SOP Instance UID") + ".dcm",
        )
        return "/".join(parts)

    def path_of(self, relpath: str) -> Path:
        """Absolute path of a spool-relative path, refusing anything that leaves the spool."""
        path = (self.root / relpath).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"path {relpath!r} is outside the spool")
        return path

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def ensure_free(self, min_free_bytes: int) -> None:
        """Raise OutOfResources when the spool's file system is below the configured minimum."""
        free = self.free_bytes()
        if free < min_free_bytes:
            raise OutOfResources(
                f"free disk {free // 2**20} MiB is below the minimum {min_free_bytes // 2**20} MiB"
            )

    def _makedirs_durable(self, directory: Path) -> None:
        """Create *directory* and its missing parents, fsyncing each parent that gained an entry."""
        missing: list[Path] = []
        current = directory
        while not current.exists():
            missing.append(current)
            current = current.parent
        for path in reversed(missing):
            with contextlib.suppress(FileExistsError):  # another process made it meanwhile
                path.mkdir(mode=0o700)
            _fsync_dir(path.parent)

    @staticmethod
    def start_writeback(partial: Path) -> None:
        """Ask the kernel to start writing *partial*'s dirty pages to disk, without waiting
        (the fsync of :meth:`commit_and_record` then waits for less); nothing where Linux's
        ``sync_file_range`` is missing or the file cannot be opened."""
        if _START_WRITEBACK is None:
            return
        try:
            fd = os.open(partial, os.O_RDONLY)
        except OSError:
            return  # the placing that follows reports what is wrong
        try:
            _START_WRITEBACK(fd, 0, 0)
        finally:
            os.close(fd)

    def commit(self, partial: Path, header: InstanceHeader) -> SpooledFile:
        """Make *partial* durable and move it to the instance's place in the spool.

        A file already there (a resend of the same SOP Instance UID) is replaced atomically.
        Raises OutOfResources when the disk is full; *partial* is removed on any failure.
        """
        relpath = self.relpath_for(header)
        size, replaced = self._place(partial, self.path_of(relpath))
        return SpooledFile(relpath=relpath, size=size, replaced=replaced)

    def commit_and_record(
        self, partial: Path, header: InstanceHeader, record: Callable[[SpooledFile], R]
    ) -> R:
        """:meth:`commit` on a flusher thread while *record* (the instance's database row, given
        the spooled file it will be) runs in this one; returns what *record* returned once both
        have finished.

        Each flush costs a file-system journal commit (about 2 ms each on the virtual disks
        measured in the admin guide) and the row's commit one more; side by side the file
        system takes them together, and the row's statements run while the disk works. The
        file's own fsync still precedes its rename, so a file at its place in the spool is
        always whole. A crash before both have finished can leave a committed row whose file
        is not (yet) at its place: that instance was never acknowledged, so the sender sends
        it again, and the worker holds such a study back until its file is there.

        Raises as :meth:`commit` does once *record* has run: NotPlaced when no file reached its
        place (*partial* is removed; the caller takes back the row *record* made), plain
        OutOfResources when the file was renamed but its directory's fsync failed (the sender
        is told to try again, and its resend replaces both). Whatever *record* raises is raised
        once the placing has ended.
        """
        relpath = self.relpath_for(header)
        final = self.path_of(relpath)
        try:
            size = partial.stat().st_size
            replaced = final.exists()
        except OSError as exc:
            self._give_up(partial, exc, placed=False)
        placed = self._flusher().submit(self._place, partial, final)
        try:
            recorded = record(SpooledFile(relpath=relpath, size=size, replaced=replaced))
        except BaseException:
            with contextlib.suppress(OutOfResources):
                placed.result()
            raise
        placed.result()
        return recorded

    def _flusher(self) -> concurrent.futures.ThreadPoolExecutor:
        """Threads that place files for :meth:`commit_and_record` (made on first use)."""
        with self._flusher_lock:
            if self._flusher_pool is None:
                self._flusher_pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=FLUSH_THREADS, thread_name_prefix="spool-fsync"
                )
            return self._flusher_pool

    def write_result(self, study_uid: str, sop_instance_uid: str, data: bytes) -> Path:
        """Durably write a result object the node made: ``results/<study>/<sop>.dcm``.

        Written to this process's incoming directory, then placed like a received instance
        (replacing an earlier identical result): after this returns, it survives a crash.
        """
        name = validate_uid(sop_instance_uid, "SOP Instance UID") + ".dcm"
        final = self.path_of(f"{RESULTS}/{validate_uid(study_uid, 'Study Instance UID')}/{name}")
        partial = self.incoming_dir() / f"result-{name}"
        try:
            partial.write_bytes(data)
        except OSError as exc:
            self._give_up(partial, exc, placed=False)
        self._place(partial, final)
        return final

    def _place(self, partial: Path, final: Path) -> tuple[int, bool]:
        """fsync *partial*, rename it to *final* (parents created durably), fsync the directory.
        Returns (size, whether a file was replaced); *partial* is removed on any failure, which
        raises NotPlaced before the rename and OutOfResources after it."""
        try:
            fd = os.open(partial, os.O_RDONLY)
            try:
                os.fsync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            replaced = final.exists()
            partial.chmod(0o600)
            for attempt in (1, 2):
                self._makedirs_durable(final.parent)
                try:
                    partial.replace(final)
                    break
                except FileNotFoundError:  # retention removed the empty directory just now
                    if attempt == 2 or not partial.exists():
                        raise
        except OSError as exc:
            self._give_up(partial, exc, placed=False)
        try:
            _fsync_dir(final.parent)
        except OSError as exc:
            self._give_up(partial, exc)
        return size, replaced

    @staticmethod
    def _give_up(partial: Path, exc: OSError, *, placed: bool = True) -> NoReturn:
        """Remove *partial* and raise OutOfResources (NotPlaced unless the file was *placed*:
        renamed to its place, its directory's fsync failed)."""
        with contextlib.suppress(OSError):
            partial.unlink()
        error = OutOfResources if placed else NotPlaced
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise error("the spool's disk is full") from exc
        raise error(f"cannot write to the spool: {exc.strerror}") from exc

    def remove(self, relpath: str) -> None:
        """Remove a spooled file (used when its database row could not be written)."""
        with contextlib.suppress(FileNotFoundError):
            self.path_of(relpath).unlink()

    def purge_study(self, study_uid: str, relpaths: list[str]) -> tuple[int, int]:
        """Remove the given files of a study, the node's result files for it, and the study's
        directories once they are empty. Returns (files removed, bytes freed); files already
        gone are skipped, so a purge cut short can simply run again."""
        removed = freed = 0
        results = self.path_of(f"{RESULTS}/{validate_uid(study_uid, 'Study Instance UID')}")
        paths = [self.path_of(relpath) for relpath in relpaths]
        if results.is_dir():
            paths.extend(p for p in results.iterdir() if p.is_file())
        for path in paths:
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
            freed += size
        keep = {self.root, self.root / RESULTS, self.root / INCOMING}
        directories = {path.parent for path in paths} | {results}
        for directory in sorted(directories, key=lambda d: len(d.parts), reverse=True):
            for candidate in (directory, directory.parent):  # series, then study directory
                if candidate not in keep and candidate.is_relative_to(self.root):
                    with contextlib.suppress(OSError):  # not empty: an instance came meanwhile
                        candidate.rmdir()
        return removed, freed
