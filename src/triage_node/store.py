"""Every query the node runs, in one place. Callers get frozen records, never rows or sessions.

The same statements run on SQLite and PostgreSQL (``INSERT ... ON CONFLICT`` exists in both).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, Table, case, exists, func, not_, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from triage_node.db import associations, instances, jobs, series, services, studies
from triage_node.domain import (
    AssociationEnd,
    InstanceHeader,
    JobState,
    ReadyStudy,
    RecordedInstance,
    SpooledFile,
    StudyState,
)


def process_owner() -> str:
    """``host:pid`` naming this process in rows it owns (associations, services)."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    owner: str
    version: str
    ae_title: str
    port: int
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None


@dataclass(frozen=True, slots=True)
class Totals:
    """What the database holds, for ``status``."""

    studies_by_state: dict[str, int]
    jobs_by_state: dict[str, int]
    instances: int
    spool_bytes: int
    last_received_at: datetime | None
    open_associations: int


class Store:
    """The node's database access. Thread-safe; one per process."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._dialect_insert: Callable[[Table], Any] = (
            postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        )

    # -- associations ------------------------------------------------------------------------

    def open_association(
        self, calling_ae: str, called_ae: str, peer_address: str, now: datetime
    ) -> int:
        with self.engine.begin() as conn:
            row = conn.execute(
                associations.insert()
                .values(
                    owner=process_owner(),
                    calling_ae=calling_ae[:16],
                    called_ae=called_ae[:16],
                    peer_address=peer_address[:64],
                    started_at=now,
                )
                .returning(associations.c.id)
            ).one()
        return int(row.id)

    def close_association(self, association_id: int, reason: AssociationEnd, now: datetime) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(associations)
                .where(associations.c.id == association_id, associations.c.ended_at.is_(None))
                .values(ended_at=now, end_reason=reason.value)
            )

    def close_lost_associations(self, is_alive: Callable[[int], bool], now: datetime) -> int:
        """Mark associations of dead receiver processes on this host as LOST."""
        host = socket.gethostname()
        with self.engine.begin() as conn:
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

    # -- instances ---------------------------------------------------------------------------

    def record_instance(
        self,
        header: InstanceHeader,
        spooled: SpooledFile,
        association_id: int | None,
        now: datetime,
    ) -> RecordedInstance:
        """Record a spooled instance; re-open its study if it was already queued or processed.

        One transaction: when it returns, the instance is committed.
        """
        insert = self._dialect_insert
        with self.engine.begin() as conn:
            previous = conn.execute(
                select(studies.c.state).where(studies.c.study_uid == header.study_uid)
            ).one_or_none()
            reopened = previous is not None and previous.state != StudyState.RECEIVED
            study_stmt = insert(studies).values(
                study_uid=header.study_uid,
                state=StudyState.RECEIVED.value,
                revision=1,
                accession_number=header.accession_number[:16],
                study_date=header.study_date[:8],
                first_received_at=now,
                last_received_at=now,
            )
            study_id = conn.execute(
                study_stmt.on_conflict_do_update(
                    index_elements=[studies.c.study_uid],
                    set_={
                        "last_received_at": now,
                        "revision": case(
                            (studies.c.state != StudyState.RECEIVED.value, studies.c.revision + 1),
                            else_=studies.c.revision,
                        ),
                        "state": StudyState.RECEIVED.value,
                    },
                ).returning(studies.c.id)
            ).scalar_one()

            series_stmt = insert(series).values(
                study_id=study_id,
                series_uid=header.series_uid,
                modality=header.modality[:16],
                body_part=header.body_part[:64],
                description=header.series_description[:64],
            )
            series_id = conn.execute(
                series_stmt.on_conflict_do_update(
                    index_elements=[series.c.series_uid],
                    set_={"modality": series_stmt.excluded.modality},
                ).returning(series.c.id)
            ).scalar_one()

            values = {
                "study_id": study_id,
                "series_id": series_id,
                "sop_class_uid": header.sop_class_uid,
                "transfer_syntax_uid": header.transfer_syntax_uid,
                "path": spooled.relpath,
                "size_bytes": spooled.size,
                "association_id": association_id,
                "received_at": now,
            }
            instance_id = conn.execute(
                insert(instances)
                .values(sop_instance_uid=header.sop_instance_uid, **values)
                .on_conflict_do_update(index_elements=[instances.c.sop_instance_uid], set_=values)
                .returning(instances.c.id)
            ).scalar_one()

            if association_id is not None:
                conn.execute(
                    update(associations)
                    .where(associations.c.id == association_id)
                    .values(instances=associations.c.instances + 1)
                )
        return RecordedInstance(
            study_id=int(study_id),
            instance_id=int(instance_id),
            replaced=spooled.replaced,
            reopened=reopened,
        )

    # -- study completeness ------------------------------------------------------------------

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
        with self.engine.connect() as conn:
            return [
                ReadyStudy(
                    study_id=r.id,
                    study_uid=r.study_uid,
                    revision=r.revision,
                    last_received_at=r.last_received_at,
                )
                for r in conn.execute(query)
            ]

    def enqueue(self, study: ReadyStudy, now: datetime) -> int | None:
        """Queue an analysis job for a settled study; None if it changed meanwhile.

        A job still waiting for the same study is superseded, so a re-opened study is analysed
        once, with all its instances.
        """
        with self.engine.begin() as conn:
            claimed = conn.execute(
                update(studies)
                .where(
                    studies.c.id == study.study_id,
                    studies.c.state == StudyState.RECEIVED.value,
                    studies.c.last_received_at == study.last_received_at,
                )
                .values(state=StudyState.QUEUED.value, queued_at=now)
            )
            if claimed.rowcount != 1:
                return None
            conn.execute(
                update(jobs)
                .where(jobs.c.study_id == study.study_id, jobs.c.state == JobState.QUEUED.value)
                .values(state=JobState.SUPERSEDED.value, finished_at=now)
            )
            job_id = conn.execute(
                jobs.insert()
                .values(
                    study_id=study.study_id,
                    study_revision=study.revision,
                    state=JobState.QUEUED.value,
                    created_at=now,
                    run_after=now,
                )
                .returning(jobs.c.id)
            ).scalar_one()
        return int(job_id)

    # -- service heartbeat -------------------------------------------------------------------

    def service_heartbeat(
        self, version: str, ae_title: str, port: int, now: datetime, *, starting: bool = False
    ) -> None:
        values: dict[str, Any] = {
            "version": version,
            "ae_title": ae_title,
            "port": port,
            "heartbeat_at": now,
            "stopped_at": None,
        }
        if starting:
            values["started_at"] = now
        with self.engine.begin() as conn:
            stmt = self._dialect_insert(services).values(
                owner=process_owner(), **{"started_at": now, **values}
            )
            conn.execute(stmt.on_conflict_do_update(index_elements=[services.c.owner], set_=values))

    def service_stopped(self, now: datetime) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(services)
                .where(services.c.owner == process_owner())
                .values(stopped_at=now, heartbeat_at=now)
            )

    def latest_service(self) -> ServiceRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(services).order_by(services.c.heartbeat_at.desc()).limit(1)
            ).one_or_none()
        if row is None:
            return None
        return ServiceRecord(
            owner=row.owner,
            version=row.version,
            ae_title=row.ae_title,
            port=row.port,
            started_at=row.started_at,
            heartbeat_at=row.heartbeat_at,
            stopped_at=row.stopped_at,
        )

    # -- status ------------------------------------------------------------------------------

    def totals(self) -> Totals:
        with self.engine.connect() as conn:
            by_state: dict[str, int] = dict(
                conn.execute(select(studies.c.state, func.count()).group_by(studies.c.state)).all()
            )
            job_states: dict[str, int] = dict(
                conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)).all()
            )
            count, size, last = conn.execute(
                select(
                    func.count(instances.c.id),
                    func.coalesce(func.sum(instances.c.size_bytes), 0),
                    func.max(instances.c.received_at),
                )
            ).one()
            open_assocs = conn.execute(
                select(func.count()).where(associations.c.ended_at.is_(None))
            ).scalar_one()
        return Totals(
            studies_by_state={str(k): int(v) for k, v in by_state.items()},
            jobs_by_state={str(k): int(v) for k, v in job_states.items()},
            instances=int(count),
            spool_bytes=int(size),
            last_received_at=last,
            open_associations=int(open_assocs),
        )

    def ping(self) -> None:
        """Raise SQLAlchemyError when the database cannot be reached."""
        with self.engine.connect() as conn:
            conn.execute(select(1))
