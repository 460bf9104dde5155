"""Alembic migrations build exactly the schema the code declares, on both backends."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from triage_node.db.engine import (
    current_revision,
    head_revision,
    make_engine,
    require_current_schema,
    upgrade,
)
from triage_node.db.schema import metadata
from triage_node.errors import SchemaOutOfDate


def test_upgrade_from_empty_matches_metadata(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        assert current_revision(engine) is None
        try:
            require_current_schema(engine)
        except SchemaOutOfDate as exc:
            assert "triage-node db upgrade" in str(exc)
        else:
            raise AssertionError("an empty database must not pass as current")
        assert upgrade(engine) == head_revision()
        assert upgrade(engine) == head_revision()  # idempotent
        require_current_schema(engine)
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diff == []
        assert set(inspect(engine).get_table_names()) >= set(metadata.tables)
    finally:
        engine.dispose()


def test_sqlite_runs_in_wal_mode(tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path / 'x.sqlite3'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    engine.dispose()
