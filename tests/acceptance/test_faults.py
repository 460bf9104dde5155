"""Faults and recovery: the database locked or away, the disk full, the model damaged or gone.
Each gives a refusal the PACS retries (A700) or a clear status and log line, never a false
success, and the node recovers on its own once the fault is gone."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import create_engine, text

from tests.support.node import Node
from tests.support.onnx_models import write_model_dir
from tests.support.peers import acknowledged, missing, storescu, wait_for
from tests.support.synth import write_study_set


def count_instances(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("select count(*) from instances")).scalar_one())
    finally:
        engine.dispose()


def spool_files(node: Node) -> list[Path]:
    return [p for p in node.spool.rglob("*.dcm") if "incoming" not in p.parts]


def test_sqlite_locked_by_another_process_gives_a700_then_recovers(tmp_path: Path) -> None:
    node = Node(tmp_path / "node", database={"busy_timeout": 0.5}).start()
    files = write_study_set(tmp_path / "set", 2, 64, 64)
    try:
        holder = sqlite3.connect(node.data_dir / "triage-node.sqlite3", isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")  # e.g. a backup tool or an admin's open transaction
        try:
            refused = storescu(node.port, files[:1])
            output = refused.stdout + refused.stderr
            assert "Received Store Response (Refused: OutOfResources)" in output, output
            assert spool_files(node) == []  # the file of the refused instance is gone again
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert count_instances(node.database_url) == 0
        accepted = storescu(node.port, files)  # the PACS's retry
        assert accepted.returncode == 0, accepted.stdout + accepted.stderr
        assert count_instances(node.database_url) == 2 and len(spool_files(node)) == 2
    finally:
        assert node.stop() == 0
    failures = [r for r in node.log_records() if r.get("action") == "database_write_failed"]
    assert failures and failures[0]["error"] == "OperationalError"


def test_postgresql_refusing_connections_gives_a700_then_recovers(
    tmp_path: Path, postgres_url: str, postgres_admin_url: str
) -> None:
    """The database goes away (every connection cut, new ones refused: what the node sees of a
    restart or a failover) while the node receives, analyses and keeps its heartbeat."""
    database = postgres_url.rsplit("/", 1)[1]
    admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    model = write_model_dir(tmp_path / "model")
    node = Node(
        tmp_path / "node",
        database_url=postgres_url,
        worker={"count": 1, "model_dir": str(model), "retry_backoff_seconds": 0.5},
    ).start()
    files = write_study_set(tmp_path / "set", 2, 64, 64)
    try:
        with admin.connect() as conn:  # the database goes away for the node
            conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false'))
            conn.execute(
                text("select pg_terminate_backend(pid) from pg_stat_activity where datname = :d"),
                {"d": database},
            )
        refused = storescu(node.port, files[:1])
        output = refused.stdout + refused.stderr
        assert "Received Store Response (Refused: OutOfResources)" in output, output
        assert spool_files(node) == []
        code, report = node.status()
        assert code == 1 and "database unreachable" in report["problems"]
        time.sleep(3)  # the scheduler and the worker meet the outage too
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true'))
        accepted = storescu(node.port, files)
        assert accepted.returncode == 0, accepted.stdout + accepted.stderr
        assert count_instances(postgres_url) == 2 and len(spool_files(node)) == 2
        wait_for(lambda: analysed(node) == 1, 60, what="the study analysed after the outage")
        wait_for(lambda: node.status()[0] == 0, 30, what="status healthy again")
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true'))
        admin.dispose()
        assert node.stop() == 0


# -- a disk that fills up -----------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(path: Path, mib: int) -> Iterator[Path]:
    """A real file system of *mib* MiB (tmpfs) at *path*; needs root (CI runs as root)."""
    path.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        missing("a small file system", f"mount -t tmpfs needs root: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path, leave_bytes: int) -> Path:
    """Fill the file system of *disk* until *leave_bytes* are free; returns the filler file."""
    filler = disk / f"filler-{len(list(disk.glob('filler-*')))}"
    stat = os.statvfs(disk)
    filler.write_bytes(b"\0" * max(stat.f_bavail * stat.f_frsize - leave_bytes, 0))
    return filler


def node_on(disk: Path, tmp_path: Path, min_free_mb: int) -> Node:
    """A node with its data directory (spool and SQLite) on *disk*, analysing; started."""
    model = write_model_dir(tmp_path / "model")
    return Node(
        tmp_path / "node",
        storage={"data_dir": str(disk / "data"), "min_free_mb": min_free_mb},
        worker={"count": 1, "model_dir": str(model)},
    ).start()


def store_responses(result: subprocess.CompletedProcess[str]) -> list[str]:
    return re.findall(r"Received Store Response \(([^)]*)\)", result.stdout + result.stderr)


def analysed(node: Node) -> int:
    return int(node.sql("select count(*) as n from studies where state = 'INFERRED'")[0]["n"])


def test_disk_below_the_minimum_refuses_with_a700_and_recovers(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", 48) as disk:
        node = node_on(disk, tmp_path, min_free_mb=8)
        files = write_study_set(tmp_path / "set", 12, 512, 512, per_study=4)
        try:
            filler = fill(disk, 4 * 2**20)
            first = storescu(node.port, files)
            responses = store_responses(first)
            assert responses and set(responses) == {"Refused: OutOfResources"}, responses
            assert node.sql("select count(*) as n from instances")[0]["n"] == 0
            code, report = node.status()
            assert code == 1 and not report["spool"]["ok"]
            assert "free disk below the configured minimum" in " ".join(report["problems"])
            refused = [r for r in node.log_records() if r.get("action") == "instance_refused"]
            assert refused and "below the minimum" in refused[0]["message"]

            filler.unlink()  # the admin makes room; the PACS sends again
            again = storescu(node.port, files)
            assert again.returncode == 0, again.stdout + again.stderr
            wait_for(lambda: analysed(node) == 3, 60, what="all three studies analysed")
            code, report = node.status()
            assert code == 0, report["problems"]
        finally:
            assert node.stop() == 0


def test_disk_full_while_receiving_aborts_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """With no reserve (min_free_mb = 0) the disk really fills while a dataset streams in:
    the association is aborted (no false success), the partial file goes, the association is
    recorded as ended, and after room is made everything is stored and analysed."""
    with small_disk(tmp_path / "disk", 32) as disk:
        node = node_on(disk, tmp_path, min_free_mb=0)
        files = write_study_set(tmp_path / "set", 8, 512, 512, per_study=4)
        try:
            filler = fill(disk, 700 * 1024)
            result = storescu(node.port, files)
            assert result.returncode != 0
            acked = acknowledged(result.stdout + result.stderr)
            assert len(acked) < len(files)
            wait_for(
                lambda: (
                    node.sql("select count(*) as n from associations where ended_at is null")[0][
                        "n"
                    ]
                    == 0
                ),
                10,
                what="the aborted association recorded as ended",
            )
            partial = [p for p in (node.spool / "incoming").rglob("*") if p.is_file()]
            assert partial == []
            stored = {
                r["sop_instance_uid"] for r in node.sql("select sop_instance_uid from instances")
            }
            for path in acked:
                assert str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) in stored

            filler.unlink()
            again = storescu(node.port, files)
            assert again.returncode == 0, again.stdout + again.stderr
            wait_for(lambda: analysed(node) == 2, 60, what="both studies analysed")
            assert any((node.spool / "results").rglob("*.dcm"))
            code, report = node.status()
            assert code == 0, report["problems"]
        finally:
            assert node.stop() == 0


# -- the model file disappears or is damaged ------------------------------------------------


def test_damaged_or_missing_model_is_reported_and_recovered(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "model")
    good = (model / "model.onnx").read_bytes()
    (model / "model.onnx").write_bytes(good[: len(good) // 2])  # damaged before the start
    node = Node(
        tmp_path / "node",
        worker={"count": 1, "model_dir": str(model), "model_retry_seconds": 0.5},
    ).start()
    files = write_study_set(tmp_path / "set", 8, 64, 64, per_study=4)
    try:
        assert storescu(node.port, files[:4]).returncode == 0  # receiving goes on regardless
        wait_for(
            lambda: node.sql("select count(*) as n from jobs where state = 'QUEUED'")[0]["n"] == 1,
            20,
            what="the study queued",
        )
        code, report = node.status()
        assert code == 1 and not report["model"]["ok"]
        assert any(p.startswith("model not usable") for p in report["problems"])
        unavailable = [r for r in node.log_records() if r.get("action") == "model_unavailable"]
        assert unavailable and "SHA-256" in unavailable[0]["message"].upper().replace(
            "SHA256", "SHA-256"
        )

        (model / "model.onnx").write_bytes(good)  # the admin puts it back
        wait_for(lambda: analysed(node) == 1, 30, what="the waiting study analysed")
        assert node.status()[0] == 0

        shutil.rmtree(model)  # gone while the worker runs: it keeps the model it loaded
        code, report = node.status()
        assert code == 1 and "model not usable" in " ".join(report["problems"])
        assert storescu(node.port, files[4:]).returncode == 0
        wait_for(lambda: analysed(node) == 2, 30, what="the next study analysed")
        write_model_dir(model)
        assert node.status()[0] == 0
    finally:
        assert node.stop() == 0
