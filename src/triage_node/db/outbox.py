"""The outbox: result objects on their way to each destination, with attempts and backoff.

One process delivers (the service's scheduler), so rows are not claimed, only updated.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    and_,
    case,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from triage_node.db.engine import Aggregate
from triage_node.db.schema import (
    fit,
    outbox,
    studies,
)
from triage_node.domain import ResultFile, ResultKind


class OutboxState(enum.StrEnum):
    """Life of one result object on its way to one destination."""

    PENDING = "PENDING"  # to send, at next_attempt_at
    SENT = "SENT"  # the destination answered Success or Warning
    DEAD = "DEAD"  # gave up after the maximum attempts; `triage-node outbox retry` revives it


@dataclass(frozen=True, slots=True)
class OutboxItem:
    id: int
    study_uid: str
    result_version: int
    kind: ResultKind
    sop_instance_uid: str
    path: Path
    destination: str
    state: OutboxState
    attempts: int
    next_attempt_at: datetime
    last_status: int | None
    last_error: str | None
    sent_at: datetime | None


class Outbox(Aggregate):
    """Result objects to send, sent, or given up on (DEAD)."""

    def add(
        self,
        study_id: int,
        result_version: int,
        files: Sequence[ResultFile],
        destinations: Sequence[str],
        now: datetime,
    ) -> None:
        """One PENDING row per file and destination; an object already there is left as it is
        (same UID = same object: a resend replaces nothing and duplicates nothing)."""
        with self._begin() as conn:
            self.add_in(conn, study_id, result_version, files, destinations, now)

    @staticmethod
    def add_in(
        conn: Connection,
        study_id: int,
        result_version: int,
        files: Sequence[ResultFile],
        destinations: Sequence[str],
        now: datetime,
    ) -> None:
        """:meth:`add` in the caller's transaction (a job's completion, in ``queue``)."""
        rows = [
            {
                "study_id": study_id,
                "result_version": result_version,
                "kind": str(f.kind),
                "sop_class_uid": f.sop_class_uid,
                "sop_instance_uid": f.sop_instance_uid,
                "path": str(f.path),
                "destination": destination,
                "state": OutboxState.PENDING.value,
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
            }
            for f in files
            for destination in destinations
        ]
        if not rows:
            return
        insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        statement = insert(outbox).on_conflict_do_nothing(
            index_elements=[outbox.c.destination, outbox.c.sop_instance_uid]
        )
        conn.execute(statement, rows)

    def _query(self) -> Any:
        return select(outbox, studies.c.study_uid).join(studies, studies.c.id == outbox.c.study_id)

    @staticmethod
    def _item(row: Any) -> OutboxItem:
        return OutboxItem(
            id=row.id,
            study_uid=row.study_uid,
            result_version=row.result_version,
            kind=ResultKind(row.kind),
            sop_instance_uid=row.sop_instance_uid,
            path=Path(row.path),
            destination=row.destination,
            state=OutboxState(row.state),
            attempts=row.attempts,
            next_attempt_at=row.next_attempt_at,
            last_status=row.last_status,
            last_error=row.last_error,
            sent_at=row.sent_at,
        )

    def previous_sr(self, study_id: int, before_version: int) -> Path | None:
        """The file of the latest SR made for an earlier revision of the study, if any."""
        query = (
            select(outbox.c.path)
            .where(
                outbox.c.study_id == study_id,
                outbox.c.kind == ResultKind.SR.value,
                outbox.c.result_version < before_version,
            )
            .order_by(outbox.c.result_version.desc(), outbox.c.id.desc())
            .limit(1)
        )
        with self._connect() as conn:
            path = conn.execute(query).scalar()
        return None if path is None else Path(path)

    def due(self, now: datetime, limit: int = 100) -> list[OutboxItem]:
        """PENDING items whose time has come, oldest first (results of a study stay together)."""
        query = (
            self._query()
            .where(outbox.c.state == OutboxState.PENDING.value, outbox.c.next_attempt_at <= now)
            .order_by(outbox.c.id)
            .limit(limit)
        )
        with self._connect() as conn:
            return [self._item(row) for row in conn.execute(query)]

    def items(
        self, state: OutboxState | None = None, limit: int = 500, *, study_uid: str | None = None
    ) -> list[OutboxItem]:
        """Items, newest first: in *state*, of *study_uid*, or all."""
        query = self._query().order_by(outbox.c.id.desc()).limit(limit)
        if state is not None:
            query = query.where(outbox.c.state == state.value)
        if study_uid is not None:
            query = query.where(studies.c.study_uid == study_uid)
        with self._connect() as conn:
            return [self._item(row) for row in conn.execute(query)]

    def sent(self, item_id: int, status: int, now: datetime) -> None:
        with self._begin() as conn:
            conn.execute(
                update(outbox)
                .where(outbox.c.id == item_id)
                .values(
                    state=OutboxState.SENT.value,
                    attempts=outbox.c.attempts + 1,
                    last_status=status,
                    last_error=None,
                    sent_at=now,
                )
            )

    def failed(
        self,
        item_id: int,
        status: int | None,
        error: str,
        *,
        retry_at: datetime,
        max_attempts: int,
    ) -> OutboxState:
        """Count a failed attempt: PENDING again at *retry_at*, or DEAD at the last one."""
        dead = OutboxState.DEAD.value
        with self._begin() as conn:
            conn.execute(
                update(outbox)
                .where(outbox.c.id == item_id)
                .values(
                    attempts=outbox.c.attempts + 1,
                    last_status=status,
                    last_error=fit(outbox, "last_error", error),
                    next_attempt_at=retry_at,
                    state=case(
                        (outbox.c.attempts + 1 >= max_attempts, dead),
                        else_=OutboxState.PENDING.value,
                    ),
                )
            )
            state = conn.execute(select(outbox.c.state).where(outbox.c.id == item_id)).scalar_one()
        return OutboxState(state)

    def retry(self, now: datetime, ids: Sequence[int] | None = None) -> int:
        """DEAD items (all, or those of *ids*) back to PENDING with a fresh attempt count."""
        condition = outbox.c.state == OutboxState.DEAD.value
        if ids is not None:
            condition = and_(condition, outbox.c.id.in_(list(ids)))
        with self._begin() as conn:
            result = conn.execute(
                update(outbox)
                .where(condition)
                .values(state=OutboxState.PENDING.value, attempts=0, next_attempt_at=now)
            )
            return int(result.rowcount or 0)

    def counts(self) -> dict[str, dict[str, int]]:
        """destination -> state -> number of items."""
        query = select(outbox.c.destination, outbox.c.state, func.count()).group_by(
            outbox.c.destination, outbox.c.state
        )
        counts: dict[str, dict[str, int]] = {}
        with self._connect() as conn:
            for destination, state, number in conn.execute(query):
                counts.setdefault(destination, {})[state] = int(number)
        return counts

    # -- priority table ----------------------------------------------------------------------

    def objects_of(self, study_id: int) -> set[str]:
        """SOP Instance UIDs of every result object the node made for the study."""
        query = select(outbox.c.sop_instance_uid).where(outbox.c.study_id == study_id).distinct()
        with self._connect() as conn:
            return set(conn.execute(query).scalars())

    @staticmethod
    def resend_latest_kos(conn: Connection, study_id: int, now: datetime) -> int:
        """Put the study's latest Key Object Selection back to PENDING (an escalation); returns
        how many items (one per destination) were re-queued. Runs in the caller's transaction."""
        latest = (
            select(func.max(outbox.c.result_version))
            .where(outbox.c.study_id == study_id, outbox.c.kind == ResultKind.KO.value)
            .scalar_subquery()
        )
        resent = conn.execute(
            update(outbox)
            .where(
                outbox.c.study_id == study_id,
                outbox.c.kind == ResultKind.KO.value,
                outbox.c.result_version == latest,
            )
            .values(state=OutboxState.PENDING.value, attempts=0, next_attempt_at=now)
        )
        return int(resent.rowcount or 0)
