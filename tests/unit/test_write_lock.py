"""The SQLite write lock: one writer at a time across threads and processes, re-entrant in a
thread, and taken by every write transaction of an aggregate on SQLite."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from triage_node.db.engine import Aggregate, make_engine
from triage_node.db.write_lock import SUFFIX, WriteLock, write_lock
from triage_node.errors import DatabaseUnavailable


def test_one_lock_per_file_and_process(tmp_path: Path) -> None:
    database = tmp_path / "node.sqlite3"
    assert write_lock(str(database)) is write_lock(str(tmp_path / "." / "node.sqlite3"))
    assert write_lock(str(database)).path == tmp_path / ("node.sqlite3" + SUFFIX)


def test_threads_take_turns_and_a_holder_may_enter_again(tmp_path: Path) -> None:
    lock = WriteLock(tmp_path / "db.sqlite3")
    order: list[str] = []

    def other() -> None:
        with lock.held():
            order.append("other")

    with lock.held():
        with lock.held():  # re-entrant: a nested write in the same thread goes on
            order.append("nested")
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(0.2)
        assert thread.is_alive(), "a second thread got in while the lock was held"
        order.append("first")
    thread.join(10)
    assert order == ["nested", "first", "other"]


CHILD = """
import sys
from pathlib import Path
from triage_node.db.write_lock import WriteLock
with WriteLock(Path(sys.argv[1])).held():
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_another_process_waits_for_the_holder(tmp_path: Path) -> None:
    database = tmp_path / "db.sqlite3"
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(database)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "held"
        fd = os.open(database.with_name(database.name + SUFFIX), os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.wait(30) == 0
    with WriteLock(database).held():  # free again once the child has committed
        pass


def test_sqlite_aggregates_write_behind_the_lock(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.sqlite3'}")
    aggregate = Aggregate(engine)
    assert aggregate._write_lock is write_lock(str(tmp_path / "node.sqlite3"))
    with aggregate._begin():
        assert aggregate._write_lock is not None
        assert getattr(aggregate._write_lock._held, "depth", 0) == 1
    assert aggregate._write_lock._held.depth == 0
    engine.dispose()
    memory = make_engine("sqlite://")
    assert Aggregate(memory)._write_lock is None
    memory.dispose()


def test_a_writer_waits_no_longer_than_the_busy_timeout_then_goes_on_to_sqlite(
    tmp_path: Path,
) -> None:
    """After the busy timeout a waiting writer goes on without the lock, so SQLite's own
    locking decides and its error names the real cause."""
    lock = WriteLock(tmp_path / "db.sqlite3", timeout=0.05)
    outcome: list[str] = []

    def other() -> None:
        waiter = WriteLock(tmp_path / "db.sqlite3", timeout=0.05)  # as another process's
        with waiter.held():
            outcome.append("went on")
            assert getattr(waiter._held, "depth", 0) == 0  # without holding the lock

    with lock.held():
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(10)
    assert outcome == ["went on"]


def test_sqlites_own_error_names_a_lock_from_outside_the_node(tmp_path: Path) -> None:
    """A writer queued behind another that is stuck on an outside lock fails with SQLite's
    OperationalError, not with an error of the write lock."""
    path = tmp_path / "node.sqlite3"
    engine = make_engine(f"sqlite:///{path}", busy_timeout=0.2)
    aggregate = Aggregate(engine)
    with aggregate._begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    outside = sqlite3.connect(path, isolation_level=None)
    outside.execute("BEGIN EXCLUSIVE")
    causes: list[str] = []

    def write() -> None:
        try:
            with aggregate._begin() as conn:
                conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        except DatabaseUnavailable as exc:
            causes.append(exc.cause)

    try:
        writers = [threading.Thread(target=write) for _ in range(2)]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(30)
    finally:
        outside.execute("ROLLBACK")
        outside.close()
    assert causes == ["OperationalError", "OperationalError"]
    engine.dispose()


def test_a_reader_holds_no_writer_up(tmp_path: Path) -> None:
    """Read-only connections begin deferred (a WAL snapshot): a write commits while a read
    transaction is open, and the reader still sees its snapshot."""
    engine = make_engine(f"sqlite:///{tmp_path / 'node.sqlite3'}", busy_timeout=0.5)
    aggregate = Aggregate(engine)
    with aggregate._begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
    with aggregate._connect() as reader:
        assert reader.exec_driver_sql("SELECT count(*) FROM t").scalar_one() == 1
        with aggregate._begin() as writer:  # would wait out the busy timeout and fail before
            writer.exec_driver_sql("INSERT INTO t VALUES (2)")
        assert reader.exec_driver_sql("SELECT count(*) FROM t").scalar_one() == 1
    with aggregate._connect() as reader:
        assert reader.exec_driver_sql("SELECT count(*) FROM t").scalar_one() == 2
    engine.dispose()
