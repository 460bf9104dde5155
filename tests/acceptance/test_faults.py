"""Database faults while receiving: a refusal the PACS retries (A700), never a false success."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import create_engine, text

from tests.support.node import Node
from tests.support.peers import storescu
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
    database = postgres_url.rsplit("/", 1)[1]
    admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    node = Node(tmp_path / "node", database_url=postgres_url).start()
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
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true'))
        accepted = storescu(node.port, files)
        assert accepted.returncode == 0, accepted.stdout + accepted.stderr
        assert count_instances(postgres_url) == 2 and len(spool_files(node)) == 2
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true'))
        admin.dispose()
        assert node.stop() == 0
