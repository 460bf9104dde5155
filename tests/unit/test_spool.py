import socket
from pathlib import Path

import pytest

from tests.support.records import header
from triage_node.errors import OutOfResources
from triage_node.spool import EarlyWriteback, Spool


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


def test_early_writeback_runs_beside_a_growing_file_and_stops(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    incoming = spool.incoming_dir()
    writeback = EarlyWriteback(incoming, interval=0.001)
    writeback.start()
    try:
        with open(incoming / "growing.dcm", "wb") as handle:
            for _ in range(50):
                handle.write(b"\0" * 65536)
                handle.flush()
        stored = spool.commit(incoming / "growing.dcm", header(sop="1.2.3.4"))
        assert stored.size == 50 * 65536
    finally:
        writeback.stop()
    assert spool.path_of(stored.relpath).stat().st_size == 50 * 65536
