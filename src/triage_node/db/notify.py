"""Wake-ups across hosts: PostgreSQL ``LISTEN``/``NOTIFY`` on one channel.

The node's processes on one host wake each other with local doorbells (``service/doorbell``).
Workers started with ``triage-node worker`` on other hosts share only the database, so a
process that rings a local doorbell also sends ``NOTIFY triage_node, '<topic> <origin>'``, and
one listening connection per host (:class:`Listening`) hears the topics rung elsewhere. SQLite
is one host's database: :attr:`Notifier.enabled` is false and nothing is sent.

A notification is a hint, never the only way work is found: PostgreSQL drops nothing while a
listener is connected, but a listener that reconnects misses what was sent in between, and the
sweeps at a long interval find it.
"""

from __future__ import annotations

import contextlib
from typing import Any

from sqlalchemy import Engine, text

from triage_node.db.engine import translate_errors
from triage_node.errors import DatabaseUnavailable

CHANNEL = "triage_node"
_PAYLOAD_LIMIT = 7999  # PostgreSQL's payload limit is 8000 bytes


class Listening:
    """One autocommit connection, held out of the pool, that listens on :data:`CHANNEL`."""

    def __init__(self, engine: Engine) -> None:
        with translate_errors():
            self._connection = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self._connection.execute(text(f"LISTEN {CHANNEL}"))
        self._driver: Any = self._connection.connection.driver_connection

    def received(self, timeout: float) -> list[str]:
        """Payloads that arrived within *timeout* seconds (empty when none did)."""
        try:
            return [n.payload for n in self._driver.notifies(timeout=timeout) if n.payload]
        except Exception as exc:  # psycopg's errors are not SQLAlchemy's
            cause = type(exc).__name__
            detail = (str(exc).splitlines() or [""])[0]
            raise DatabaseUnavailable(f"database error: {cause}: {detail}", cause=cause) from exc

    def close(self) -> None:
        with contextlib.suppress(Exception):  # already broken: nothing left to close
            self._connection.invalidate()  # a listening connection must not go back to the pool
            self._connection.close()

    def __enter__(self) -> Listening:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class Notifier:
    """Sends and listens for cross-host wake-ups on PostgreSQL; does nothing on SQLite."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.enabled = engine.dialect.name == "postgresql"

    def notify(self, topic: str, origin: str) -> None:
        """``NOTIFY`` *topic* from *origin*; delivered to listeners when it commits (at once)."""
        if not self.enabled:
            return
        payload = f"{topic} {origin}"[:_PAYLOAD_LIMIT]
        with translate_errors(), self.engine.begin() as conn:
            conn.execute(
                text("SELECT pg_notify(:channel, :payload)"),
                {"channel": CHANNEL, "payload": payload},
            )

    def listen(self) -> Listening:
        if not self.enabled:
            raise ValueError("cross-host notifications need PostgreSQL")
        return Listening(self.engine)


def parse(payload: str) -> tuple[str, str]:
    """``(topic, origin)`` of a payload :meth:`Notifier.notify` sent."""
    topic, _, origin = payload.partition(" ")
    return topic, origin
