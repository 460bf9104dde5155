"""Processes: the service's and the workers' heartbeats, and the totals ``status`` reports."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Table,
    case,
    func,
    select,
    update,
)

from triage_node.db.engine import Aggregate, process_owner
from triage_node.db.schema import (
    associations,
    fit,
    instances,
    jobs,
    services,
    studies,
    workers,
)


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
class WorkerRecord:
    owner: str
    model_name: str
    model_version: str
    provider: str
    jobs_done: int
    heartbeat_at: datetime


@dataclass(frozen=True, slots=True)
class Totals:
    """What the database holds, for ``status``."""

    studies_by_state: dict[str, int]
    jobs_by_state: dict[str, int]
    instances: int
    spool_bytes: int
    last_received_at: datetime | None
    open_associations: int


class Processes(Aggregate):
    """Heartbeat rows of the service and its workers; what the database holds in all."""

    def _heartbeat(self, table: Table, values: dict[str, Any], now: datetime) -> None:
        """Insert or refresh this process's row (keyed by ``host:pid``) in *table*."""
        values = {**values, "heartbeat_at": now, "stopped_at": None}
        with self._begin() as conn:
            stmt = self._insert(table).values(
                owner=process_owner(), **{"started_at": now, **values}
            )
            conn.execute(stmt.on_conflict_do_update(index_elements=[table.c.owner], set_=values))

    def _stopped(self, table: Table, now: datetime) -> None:
        with self._begin() as conn:
            conn.execute(
                update(table)
                .where(table.c.owner == process_owner())
                .values(stopped_at=now, heartbeat_at=now)
            )

    def service_heartbeat(
        self, version: str, ae_title: str, port: int, now: datetime, *, starting: bool = False
    ) -> None:
        values: dict[str, Any] = {"version": version, "ae_title": ae_title, "port": port}
        if starting:
            values["started_at"] = now
        self._heartbeat(services, values, now)

    def service_stopped(self, now: datetime) -> None:
        self._stopped(services, now)

    def worker_heartbeat(
        self, model: str, version: str, provider: str, jobs_done: int, now: datetime
    ) -> None:
        values = {
            "model_name": fit(workers, "model_name", model),
            "model_version": fit(workers, "model_version", version),
            "provider": fit(workers, "provider", provider),
            "jobs_done": jobs_done,
        }
        self._heartbeat(workers, values, now)

    def worker_stopped(self, now: datetime) -> None:
        self._stopped(workers, now)

    def live_workers(self, since: datetime) -> list[WorkerRecord]:
        """Workers that sent a heartbeat after *since* and have not stopped."""
        query = (
            select(workers)
            .where(workers.c.heartbeat_at >= since, workers.c.stopped_at.is_(None))
            .order_by(workers.c.owner)
        )
        with self._connect() as conn:
            return [
                WorkerRecord(
                    owner=r.owner,
                    model_name=r.model_name,
                    model_version=r.model_version,
                    provider=r.provider,
                    jobs_done=r.jobs_done,
                    heartbeat_at=r.heartbeat_at,
                )
                for r in conn.execute(query)
            ]

    def latest_service(self) -> ServiceRecord | None:
        with self._connect() as conn:
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

    def totals(self) -> Totals:
        with self._connect() as conn:
            by_state: dict[str, int] = dict(
                conn.execute(select(studies.c.state, func.count()).group_by(studies.c.state)).all()
            )
            job_states: dict[str, int] = dict(
                conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)).all()
            )
            count, size, last = conn.execute(
                select(
                    func.count(instances.c.id),
                    func.coalesce(
                        func.sum(case((instances.c.purged_at.is_(None), instances.c.size_bytes))),
                        0,
                    ),
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
