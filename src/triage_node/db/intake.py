"""Intake: associations, the instances they store, and which studies are complete (settled).

The same statements run on SQLite and PostgreSQL (``INSERT ... ON CONFLICT`` exists in both).
"""

from __future__ import annotations

import enum
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    bindparam,
    case,
    delete,
    exists,
    not_,
    or_,
    select,
    update,
)

from triage_node.db.engine import Aggregate, DriverStatement, driver_cursor, process_owner
from triage_node.db.schema import (
    associations,
    fit,
    image_results,
    instances,
    series,
    studies,
)
from triage_node.domain import AssociationEnd, InstanceHeader, SpooledFile


class StudyState(enum.StrEnum):
    """Where a study is on the data path (architecture.md, result contract item 4)."""

    RECEIVED = "RECEIVED"  # instances arriving, or settling before it is queued
    QUEUED = "QUEUED"  # a job waits for a worker
    INFERRED = "INFERRED"  # analysed; ``outcome`` says how


@dataclass(frozen=True, slots=True)
class RecordedInstance:
    """What the database said after an instance was recorded."""

    study_id: int
    instance_id: int
    replaced: bool  # the SOP Instance UID was already known (a resend)
    reopened: bool  # the study had already been queued or processed


@dataclass(frozen=True, slots=True)
class ReadyStudy:
    """A study that has settled and may be queued."""

    study_id: int
    study_uid: str
    revision: int
    last_received_at: datetime


@dataclass(frozen=True, slots=True)
class _RecordStatements:
    previous_state: DriverStatement
    study: DriverStatement
    series: DriverStatement
    instance: DriverStatement
    count: DriverStatement


class Intake(Aggregate):
    """Associations and stored instances; the study-completeness rule."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self._record = self._record_statements()

    def open_association(
        self, calling_ae: str, called_ae: str, peer_address: str, now: datetime
    ) -> int:
        with self._begin() as conn:
            row = conn.execute(
                associations.insert()
                .values(
                    owner=process_owner(),
                    calling_ae=fit(associations, "calling_ae", calling_ae),
                    called_ae=fit(associations, "called_ae", called_ae),
                    peer_address=fit(associations, "peer_address", peer_address),
                    started_at=now,
                )
                .returning(associations.c.id)
            ).one()
        return int(row.id)

    def close_association(self, association_id: int, reason: AssociationEnd, now: datetime) -> None:
        with self._begin() as conn:
            conn.execute(
                update(associations)
                .where(associations.c.id == association_id, associations.c.ended_at.is_(None))
                .values(ended_at=now, end_reason=reason.value)
            )

    def close_lost_associations(self, is_alive: Callable[[int], bool], now: datetime) -> int:
        """Mark associations of dead receiver processes on this host as LOST."""
        host = socket.gethostname()
        with self._begin() as conn:
            rows = conn.execute(
                select(associations.c.id, associations.c.owner).where(
                    associations.c.ended_at.is_(None),
                    associations.c.owner.like(f"{host}:%"),
                )
            ).all()
            lost = [r.id for r in rows if not is_alive(int(r.owner.rpartition(":")[2]))]
            if lost:
                conn.execute(
                    update(associations)
                    .where(associations.c.id.in_(lost))
                    .values(ended_at=now, end_reason=AssociationEnd.LOST.value)
                )
        return len(lost)

    def _record_statements(self) -> _RecordStatements:
        """The statements of :meth:`record_instance`, built and compiled once with bound
        parameters: building them per call cost more than the commit (~1.2 ms per instance,
        profiled)."""
        insert = self._insert
        received = StudyState.RECEIVED.value
        study = insert(studies).values(
            study_uid=bindparam("study_uid"),
            state=received,
            revision=1,
            accession_number=bindparam("accession_number"),
            study_date=bindparam("study_date"),
            first_received_at=bindparam("now"),
            last_received_at=bindparam("now"),
        )
        series_insert = insert(series).values(
            study_id=bindparam("study_id"),
            series_uid=bindparam("series_uid"),
            modality=bindparam("modality"),
            body_part=bindparam("body_part"),
            description=bindparam("description"),
        )
        columns = (
            "study_id",
            "series_id",
            "sop_class_uid",
            "transfer_syntax_uid",
            "path",
            "size_bytes",
            "association_id",
            "received_at",
        )
        instance_values: dict[str, Any] = {c: bindparam(c) for c in columns}
        study_upsert = study.on_conflict_do_update(
            index_elements=[studies.c.study_uid],
            set_={
                "last_received_at": bindparam("now"),
                "revision": case(
                    (studies.c.state != received, studies.c.revision + 1),
                    else_=studies.c.revision,
                ),
                "state": received,
                "purged_at": None,  # it has a file on disk again
            },
        ).returning(studies.c.id)
        series_upsert = series_insert.on_conflict_do_update(
            index_elements=[series.c.series_uid],
            set_={"modality": series_insert.excluded.modality},
        ).returning(series.c.id)
        instance_upsert = (
            insert(instances)
            .values(sop_instance_uid=bindparam("sop_instance_uid"), **instance_values)
            .on_conflict_do_update(
                index_elements=[instances.c.sop_instance_uid],
                set_={**instance_values, "purged_at": None},  # a resend after retention
            )
            .returning(instances.c.id)
        )
        count = (
            update(associations)
            .where(associations.c.id == bindparam("association"))
            .values(instances=associations.c.instances + 1)
        )
        previous_state = select(studies.c.state).where(
            studies.c.study_uid == bindparam("study_uid")
        )
        dialect = self.engine.dialect
        return _RecordStatements(
            previous_state=DriverStatement(previous_state, dialect),
            study=DriverStatement(study_upsert, dialect),
            series=DriverStatement(series_upsert, dialect),
            instance=DriverStatement(instance_upsert, dialect),
            count=DriverStatement(count, dialect),
        )

    def record_instance(
        self,
        header: InstanceHeader,
        spooled: SpooledFile,
        association_id: int | None,
        now: datetime,
    ) -> RecordedInstance:
        """Record a spooled instance; re-open its study if it was already queued or processed.

        One transaction: when it returns, the instance is committed. Its statements run on the
        driver's cursor (:class:`DriverStatement`): this runs once per received instance, under
        the database's write lock.
        """
        sql = self._record
        with self._begin() as conn, driver_cursor(conn) as cursor:
            previous = sql.previous_state.first(cursor, {"study_uid": header.study_uid})
            reopened = previous is not None and previous[0] != StudyState.RECEIVED
            (study_id,) = sql.study.first(
                cursor,
                {
                    "study_uid": header.study_uid,
                    "accession_number": fit(studies, "accession_number", header.accession_number),
                    "study_date": fit(studies, "study_date", header.study_date),
                    "now": now,
                },
            )
            (series_id,) = sql.series.first(
                cursor,
                {
                    "study_id": study_id,
                    "series_uid": header.series_uid,
                    "modality": fit(series, "modality", header.modality),
                    "body_part": fit(series, "body_part", header.body_part),
                    "description": fit(series, "description", header.series_description),
                },
            )
            (instance_id,) = sql.instance.first(
                cursor,
                {
                    "sop_instance_uid": header.sop_instance_uid,
                    "study_id": study_id,
                    "series_id": series_id,
                    "sop_class_uid": header.sop_class_uid,
                    "transfer_syntax_uid": header.transfer_syntax_uid,
                    "path": spooled.relpath,
                    "size_bytes": spooled.size,
                    "association_id": association_id,
                    "received_at": now,
                },
            )
            if association_id is not None:
                sql.count.first(cursor, {"association": association_id})
        return RecordedInstance(
            study_id=int(study_id),
            instance_id=int(instance_id),
            replaced=spooled.replaced,
            reopened=reopened,
        )

    def forget_instance(self, recorded: RecordedInstance, association_id: int | None) -> bool:
        """Take back the row :meth:`record_instance` made for a new instance whose file never
        reached the spool (the sender was told to send it again). An instance that results
        already refer to is kept. Returns whether the row was removed."""
        if recorded.replaced:
            return False  # the row and an earlier file were there before
        with self._begin() as conn:
            removed = conn.execute(
                delete(instances).where(
                    instances.c.id == recorded.instance_id,
                    not_(
                        exists(
                            select(image_results.c.id).where(
                                image_results.c.instance_id == instances.c.id
                            )
                        )
                    ),
                )
            ).rowcount
            if removed and association_id is not None:
                conn.execute(
                    update(associations)
                    .where(associations.c.id == association_id, associations.c.instances > 0)
                    .values(instances=associations.c.instances - 1)
                )
        return bool(removed)

    def ready_studies(
        self, now: datetime, settle: timedelta, stale: timedelta, limit: int = 100
    ) -> list[ReadyStudy]:
        """Studies quiet for *settle* whose sending associations have all ended.

        An association still open but silent for *stale* no longer holds a study back (its
        receiver may have died on another host, or the peer may keep associations open).
        """
        open_sender = exists(
            select(instances.c.id)
            .join(associations, associations.c.id == instances.c.association_id)
            .where(instances.c.study_id == studies.c.id, associations.c.ended_at.is_(None))
        )
        query = (
            select(
                studies.c.id, studies.c.study_uid, studies.c.revision, studies.c.last_received_at
            )
            .where(
                studies.c.state == StudyState.RECEIVED.value,
                studies.c.last_received_at <= now - settle,
                or_(studies.c.last_received_at <= now - stale, not_(open_sender)),
            )
            .order_by(studies.c.last_received_at)
            .limit(limit)
        )
        with self._connect() as conn:
            return [
                ReadyStudy(
                    study_id=r.id,
                    study_uid=r.study_uid,
                    revision=r.revision,
                    last_received_at=r.last_received_at,
                )
                for r in conn.execute(query)
            ]
