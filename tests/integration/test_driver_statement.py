"""DriverStatement (the per-instance path's statements, run on the driver's cursor) against
SQLAlchemy's own execution, on SQLite and on PostgreSQL: the same rows stored, the same
values read back, and a driver error translated as SQLAlchemy's are."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from triage_node.db.engine import DriverStatement, driver_cursor, make_engine
from triage_node.db.schema import UTCDateTime
from triage_node.errors import DatabaseUnavailable

metadata = MetaData()
things = Table(
    "driver_statement_things",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("code", String(16), nullable=False, unique=True),
    Column("seen_at", UTCDateTime(), nullable=True),
    Column("seen_again_at", UTCDateTime(), nullable=True),
    Column("note", String(16), nullable=True),
    Column("count", Integer, nullable=False, server_default="0"),
)
AT = datetime(2026, 12, 8, 7, 30, 1, tzinfo=UTC)  # no microseconds: stored with them all the same


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    metadata.create_all(engine)
    yield engine
    engine.dispose()


def upsert(engine: Engine) -> object:
    insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
    statement = insert(things).values(
        code=bindparam("code"),
        seen_at=bindparam("at"),  # one parameter in two places, and a literal None
        seen_again_at=bindparam("at"),
        note=None,
    )
    return statement.on_conflict_do_update(
        index_elements=[things.c.code], set_={"count": things.c.count + 1}
    ).returning(things.c.id)


def test_stores_what_sqlalchemy_stores(engine: Engine) -> None:
    statement = upsert(engine)
    with engine.begin() as conn:
        by_sqlalchemy = conn.execute(statement, {"code": "A", "at": AT}).scalar_one()
    with engine.begin() as conn, driver_cursor(conn) as cursor:
        (by_driver,) = DriverStatement(statement, engine.dialect).first(
            cursor, {"code": "B", "at": AT}
        )
        again = DriverStatement(statement, engine.dialect).first(cursor, {"code": "B", "at": AT})
    assert again == (by_driver,) and by_driver != by_sqlalchemy
    with engine.connect() as conn:
        # as stored (SQLite keeps text: the same format), and as read back (aware UTC)
        raw = conn.execute(
            text("SELECT code, seen_at, seen_again_at, note, count FROM driver_statement_things")
        ).all()
        rows = conn.execute(select(things.c.code, things.c.seen_at).order_by(things.c.code)).all()
    stored = {row[0]: tuple(row[1:]) for row in raw}
    assert stored["A"][:3] == stored["B"][:3]
    assert stored["A"][3] == 0 and stored["B"][3] == 1  # the conflict ran the update once
    assert [tuple(row) for row in rows] == [("A", AT), ("B", AT)]


def test_a_statement_without_rows_gives_none(engine: Engine) -> None:
    statement = update(things).where(things.c.code == bindparam("wanted")).values(note="x")
    with engine.begin() as conn, driver_cursor(conn) as cursor:
        assert DriverStatement(statement, engine.dialect).first(cursor, {"wanted": "Z"}) is None


def test_a_driver_error_is_database_unavailable_and_rolls_back(engine: Engine) -> None:
    insert = things.insert().values(code=bindparam("code")).returning(things.c.id)
    statement = DriverStatement(insert, engine.dialect)
    with engine.begin() as conn, driver_cursor(conn) as cursor:
        statement.first(cursor, {"code": "ACC-SECRET"})
    with (
        pytest.raises(DatabaseUnavailable) as raised,
        engine.begin() as conn,
        driver_cursor(conn) as cursor,
    ):
        statement.first(cursor, {"code": "OTHER"})
        statement.first(cursor, {"code": "ACC-SECRET"})  # unique: the driver refuses
    assert "Integrity" in raised.value.cause or "Unique" in raised.value.cause
    assert "ACC-SECRET" not in str(raised.value)  # no value of a row in the message
    with engine.connect() as conn:
        codes = conn.execute(select(things.c.code)).scalars().all()
    assert codes == ["ACC-SECRET"]  # OTHER went with the failed transaction
