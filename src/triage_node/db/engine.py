"""Engine set-up, schema migrations (Alembic), and the base of the aggregates' query classes.

SQLite (WAL, ``synchronous=FULL``) is the embedded default; PostgreSQL is used by URL when several
receivers or workers on more than one host share the work. Driver errors become
:class:`triage_node.errors.DatabaseUnavailable` here and nowhere else (:func:`translate_errors`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Dialect, Engine, Table, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from triage_node.db.write_lock import write_lock
from triage_node.errors import DatabaseError, DatabaseUnavailable, SchemaOutOfDate

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def process_owner() -> str:
    """``host:pid`` naming this process in rows it owns (associations, services, leases)."""
    return f"{socket.gethostname()}:{os.getpid()}"


@contextmanager
def translate_errors() -> Iterator[None]:
    """Turn a driver error (database away, locked, refused) into :class:`DatabaseUnavailable`,
    whose ``cause`` names the driver's exception class for logs."""
    try:
        yield
    except SQLAlchemyError as exc:
        # The driver's own message, not SQLAlchemy's rendering of the statement and its
        # parameters: those can hold an accession number, which must not reach a log.
        raise _unavailable(type(exc).__name__, getattr(exc, "orig", None) or exc) from exc


def _unavailable(cause: str, error: BaseException) -> DatabaseUnavailable:
    """DatabaseUnavailable naming *cause* (the exception's class) and the first line of the
    driver's message: its later lines can quote a row's values."""
    detail = str(error).split("\n", 1)[0]
    return DatabaseUnavailable(f"database error: {cause}: {detail}", cause=cause)


class DriverStatement:
    """A Core statement compiled once for a dialect and run on the driver's cursor of a
    SQLAlchemy connection, in that connection's transaction.

    For the per-instance path only (``Intake.record_instance``): there SQLAlchemy's execution
    (statement cache, execution context, result object) cost about as much as the statements and
    the commit together, and it runs under the database's write lock, so every other writer waits
    for it too (measured on SQLite, the whole ``record_instance`` with its commit: 0.95-1.51 ms
    of CPU through ``Connection.execute``, 0.57-0.80 ms through the cursor). The SQL text is
    SQLAlchemy's own for the dialect, and the values pass through the same bind processors
    (the column types' ``bind_processor``) as ``Connection.execute`` applies. A driver error
    becomes :class:`DatabaseUnavailable` as SQLAlchemy's do in :func:`translate_errors` (the
    statement left out of it, too).
    """

    def __init__(self, statement: Any, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql = compiled.string
        self._compiled = compiled
        self._positions: tuple[str, ...] | None = (
            tuple(compiled.positiontup) if compiled.positional else None
        )
        self._processors = {
            name: process
            for bind, name in compiled.bind_names.items()
            if (process := bind.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        }
        self._driver_error: type[Exception] = dialect.loaded_dbapi.Error

    def first(self, cursor: Any, params: dict[str, Any]) -> Any:
        """Run on *cursor* (:func:`driver_cursor`) with *params*; the first row it returned
        (a tuple), or None (none, or a statement that returns no rows)."""
        try:
            self._execute(cursor, params)
            return None if cursor.description is None else cursor.fetchone()
        except self._driver_error as exc:
            raise _unavailable(type(exc).__name__, exc) from exc

    def _execute(self, cursor: Any, params: dict[str, Any]) -> None:
        values = self._compiled.construct_params(params)
        for name, process in self._processors.items():
            values[name] = process(values[name])
        if self._positions is None:
            cursor.execute(self.sql, values)
        else:
            cursor.execute(self.sql, [values[name] for name in self._positions])


@contextmanager
def driver_cursor(conn: Connection) -> Iterator[Any]:
    """A cursor of *conn*'s driver connection, for :class:`DriverStatement`; closed after."""
    cursor = conn.connection.cursor()
    try:
        yield cursor
    finally:
        cursor.close()


class Aggregate:
    """Base of the query classes: the shared engine and transactions that translate errors.
    Thread-safe; the engine's pool hands each call its own connection."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._insert: Callable[[Table], Any] = (
            postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        )
        database = sqlite_path(engine.url.render_as_string(hide_password=False))
        self._write_lock = write_lock(database) if database else None

    @contextmanager
    def _begin(self) -> Iterator[Connection]:
        """A write transaction, committed when the block ends without an error (on SQLite
        behind the host's write lock, :mod:`triage_node.db.write_lock`)."""
        held = self._write_lock.held() if self._write_lock is not None else nullcontext()
        with held, translate_errors(), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        """A read-only connection (on SQLite its transactions begin deferred: they wait for no
        writer and hold no writer up)."""
        with translate_errors(), self.engine.connect() as conn:
            yield conn.execution_options(**{READ_ONLY: True})


READ_ONLY = "triage_node_read_only"  # execution option of Aggregate._connect's connections


def _sqlite_begin(conn: Connection) -> None:
    """BEGIN IMMEDIATE for a write transaction (it takes SQLite's write lock at once, so it
    cannot fail half-way for a writer that came in between), a deferred BEGIN for a read-only
    connection's (a WAL snapshot: it neither waits for writers nor holds them up)."""
    read_only = conn.get_execution_options().get(READ_ONLY, False)
    conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _sqlite_pragmas(busy_timeout: float) -> Any:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN IMMEDIATE instead of pysqlite's implicit
        # deferred BEGIN: a deferred transaction that reads and then writes can fail at once
        # with SQLITE_BUSY under WAL when another process committed in between.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        # FULL: a commit is on disk when it returns, so a success status survives power loss.
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    return on_connect


def make_engine(url: str, *, busy_timeout: float = 30.0) -> Engine:
    """An engine for *url*; SQLite files get WAL mode and their directory is created."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": busy_timeout})
        event.listen(engine, "connect", _sqlite_pragmas(busy_timeout))
        event.listen(engine, "begin", _sqlite_begin)
        database = sqlite_path(url)
        if database:
            write_lock(database, timeout=busy_timeout)
        return engine
    if parsed.get_backend_name() == "postgresql":
        return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
    raise DatabaseError(f"unsupported database backend {parsed.get_backend_name()!r}")


def sqlite_path(url: str) -> str | None:
    """The database file of an SQLite URL; None for any other backend (or in memory)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return str(parsed.database)


def redact_url(url: str) -> str:
    """The URL with any password hidden, for logs and ``status``."""
    return make_url(url).render_as_string(hide_password=True)


def _alembic_config(engine: Engine) -> Any:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str:
    """The newest schema revision this version of triage-node knows."""
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory(str(MIGRATIONS_DIR)).get_heads()
    if len(heads) != 1:
        raise DatabaseError(f"migrations have {len(heads)} heads; expected exactly one")
    return str(heads[0])


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at (None for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    with translate_errors(), engine.connect() as connection:
        revision = MigrationContext.configure(connection).get_current_revision()
    return None if revision is None else str(revision)


def upgrade(engine: Engine) -> str:
    """Apply every pending migration; return the revision reached."""
    from alembic import command

    with translate_errors():
        command.upgrade(_alembic_config(engine), "head")
    return head_revision()


def require_current_schema(engine: Engine) -> None:
    """Raise :class:`SchemaOutOfDate` unless the database is at the head revision."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise SchemaOutOfDate(
            f"database schema is at {current or 'nothing'}, this version needs {head}: "
            "run 'triage-node db upgrade'"
        )
