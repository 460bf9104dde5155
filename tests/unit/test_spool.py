import os
import socket
import stat
import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta, encode

from tests.support.records import header
from triage_node import spool as spool_module
from triage_node.domain import SpooledFile
from triage_node.errors import NotPlaced, OutOfResources
from triage_node.spool import Spool


def partial_file(spool: Spool, content: bytes) -> Path:
    path = spool.incoming_dir() / "tmp1234.dcm"
    path.write_bytes(content)
    return path


def test_commit_moves_into_uid_path_owner_only(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    stored = spool.commit(partial_file(spool, b"first"), header(sop="1.2.3.4"))
    assert stored.relpath == "1.2.3/1.2.3.1/1.2.3.4.dcm"
    assert stored.size == 5 and not stored.replaced
    final = spool.path_of(stored.relpath)
    assert final.read_bytes() == b"first"
    assert final.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "spool").stat().st_mode & 0o777 == 0o700
    assert not any(spool.incoming_dir().iterdir())


def test_commit_replaces_a_resend(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    spool.commit(partial_file(spool, b"first"), header(sop="1.2.3.4"))
    again = spool.commit(partial_file(spool, b"second!"), header(sop="1.2.3.4"))
    assert again.replaced and again.size == 7
    assert spool.path_of(again.relpath).read_bytes() == b"second!"


def test_commit_and_record_places_the_file_while_recording(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The row is recorded while a flusher thread fsyncs the file (it waits here until the
    record has started), renames it and fsyncs its directory; all finish before it returns."""
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    recording = threading.Event()
    flushed: list[str] = []
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        if threading.current_thread().name.startswith("spool-fsync"):
            assert recording.wait(10), "the record did not start while the file was synced"
            flushed.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    given: list[SpooledFile] = []

    def record(spooled: SpooledFile) -> str:
        given.append(spooled)
        recording.set()
        return "row"

    recorded = spool.commit_and_record(partial_file(spool, b"whole"), header(sop="1.2.3.4"), record)
    [spooled] = given
    assert recorded == "row" and spooled.size == 5 and not spooled.replaced
    assert spool.path_of(spooled.relpath).read_bytes() == b"whole"
    assert flushed[0] == "file" and flushed[-1] == "dir"  # the file's fsync before its rename's
    again = spool.commit_and_record(partial_file(spool, b"again"), header(sop="1.2.3.4"), record)
    assert again == "row" and given[-1].replaced


def test_commit_and_record_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the record raises is raised once the file is placed (it stays for the caller to
    judge); a file that cannot be fsynced is NotPlaced (removed, nothing at its place); a
    directory fsync that fails after the rename is plain OutOfResources, as from commit."""
    spool = Spool(tmp_path / "spool")
    spool.prepare()

    def refuse(spooled: SpooledFile) -> None:
        raise RuntimeError("no row")

    with pytest.raises(RuntimeError, match="no row"):
        spool.commit_and_record(partial_file(spool, b"a"), header(sop="1.2.3.4"), refuse)
    assert spool.path_of("1.2.3/1.2.3.1/1.2.3.4.dcm").read_bytes() == b"a"

    real_fsync = os.fsync

    def broken_file_fsync(fd: int) -> None:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(5, os.strerror(5))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", broken_file_fsync)
    recorded: list[SpooledFile] = []
    partial = partial_file(spool, b"b")
    with pytest.raises(NotPlaced, match="cannot write to the spool: Input/output error"):
        spool.commit_and_record(partial, header(sop="1.2.3.5"), recorded.append)
    assert len(recorded) == 1  # the row was made meanwhile: the caller takes it back
    assert not partial.exists() and not spool.path_of("1.2.3/1.2.3.1/1.2.3.5.dcm").exists()
    monkeypatch.setattr(os, "fsync", real_fsync)

    def broken_fsync_dir(path: Path) -> None:
        raise OSError(5, os.strerror(5))

    monkeypatch.setattr(spool_module, "_fsync_dir", broken_fsync_dir)
    with pytest.raises(OutOfResources, match="cannot write to the spool: Input/output error") as e:
        spool.commit_and_record(partial_file(spool, b"c"), header(sop="1.2.3.6"), str)
    assert not isinstance(e.value, NotPlaced)
    assert spool.path_of("1.2.3/1.2.3.1/1.2.3.6.dcm").read_bytes() == b"c"


def test_paths_cannot_leave_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    for bad in ("../x.dcm", "/etc/passwd", "1.2/../../../x", ""):
        with pytest.raises(ValueError, match="outside the spool"):
            spool.path_of(bad)


def test_disk_guard(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    spool.ensure_free(0)
    with pytest.raises(OutOfResources, match="below the minimum"):
        spool.ensure_free(2**62)


def test_commit_failure_removes_partial_and_says_out_of_resources(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    partial = partial_file(spool, b"data")
    (spool.root / "1.2.3").write_text("a file where the study directory should be")
    with pytest.raises(OutOfResources, match="cannot write to the spool"):
        spool.commit(partial, header(sop="1.2.3.4"))
    assert not partial.exists()


def test_purge_stale_incoming_only_touches_dead_processes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    mine = spool.incoming_dir()
    (mine / "live.dcm").write_bytes(b"x")
    dead = spool.root / "incoming" / f"{socket.gethostname()}-{2**22 + 12345}"
    dead.mkdir()
    (dead / "partial.dcm").write_bytes(b"x")
    other_host = spool.root / "incoming" / "some-other-host-1"
    other_host.mkdir()
    assert spool.purge_stale_incoming() == 1
    assert not dead.exists() and other_host.exists() and (mine / "live.dcm").exists()


def recorded_writeback(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The (offset, length) ranges a ReceivedFile asks the kernel to start writing."""
    requests: list[tuple[int, int]] = []
    monkeypatch.setattr(
        spool_module,
        "_START_WRITEBACK",
        lambda fd, offset, length: requests.append((offset, length)),
    )
    return requests


def received(directory: Path) -> spool_module.ReceivedFile:
    """A file made as pynetdicom makes the one it streams a C-STORE's dataset to."""
    return spool_module.received_file(directory)(delete=False, mode="wb", suffix=".dcm")


def test_a_received_file_starts_writeback_every_megabyte_as_it_grows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = recorded_writeback(monkeypatch)
    file = received(tmp_path)
    chunk = bytes(range(256)) * 256  # 64 KiB, as pynetdicom writes a PDU's fragment
    for _ in range(56):  # 3.5 MiB
        file.write(chunk)
        file.file.flush()  # what pynetdicom calls after each fragment
    file.close()
    megabyte = spool_module.WRITEBACK_EVERY
    assert requests == [(0, megabyte), (megabyte, megabyte), (2 * megabyte, megabyte)]
    path = Path(file.name)
    assert path.parent == tmp_path and path.suffix == ".dcm" and file.closed
    assert path.read_bytes() == chunk * 56


def test_a_small_received_file_asks_for_no_writeback_while_it_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = recorded_writeback(monkeypatch)
    file = received(tmp_path)
    for _ in range(8):  # 0.5 MiB: Storer.store starts its writeback once it is whole
        file.write(b"\0" * 65536)
        file.file.flush()
    file.close()
    assert requests == []


def test_pynetdicom_can_stream_a_dataset_into_a_received_file(tmp_path: Path) -> None:
    """pynetdicom's calls on the file it streams a C-STORE's dataset to (dimse_messages):
    the preamble, pydicom's File Meta writer, the fragments, flushes, close."""
    file = received(tmp_path)
    file.write(b"\x00" * 128)
    file.write(b"DICM")
    write_file_meta_info(
        file,  # type: ignore[arg-type]
        create_file_meta(
            sop_class_uid=UID("1.2.840.10008.5.1.4.1.1.1"),
            sop_instance_uid=UID("1.2.3.4"),
            transfer_syntax=UID("1.2.840.10008.1.2.1"),
        ),
    )
    body = Dataset()
    body.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    body.SOPInstanceUID = "1.2.3.4"
    body.PatientID = "x"
    encoded = encode(body, False, True)
    assert encoded is not None
    file.write(encoded)
    file.file.flush()
    file.close()
    assert dcmread(file.name).SOPInstanceUID == "1.2.3.4"


def test_received_files_are_never_deleted_on_close_nor_read(tmp_path: Path) -> None:
    make = spool_module.received_file(tmp_path)
    with pytest.raises(ValueError, match="written once"):
        make(delete=True, mode="wb", suffix=".dcm")
    with pytest.raises(ValueError, match="written once"):
        make(delete=False, mode="w+b", suffix=".dcm")


def test_start_writeback_asks_for_the_whole_file_and_ignores_a_missing_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = recorded_writeback(monkeypatch)
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    partial = partial_file(spool, b"x" * 1000)
    spool.start_writeback(partial)
    spool.start_writeback(partial.with_name("gone.dcm"))
    assert requests == [(0, 0)]  # offset 0, length 0: to the end of the file


def test_a_received_file_with_real_writeback_is_stored_whole(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    file = received(spool.incoming_dir())
    for _ in range(50):
        file.write(b"\0" * 65536)
        file.file.flush()
    file.close()
    spool.start_writeback(Path(file.name))
    stored = spool.commit(Path(file.name), header(sop="1.2.3.4"))
    assert spool.path_of(stored.relpath).stat().st_size == 50 * 65536
