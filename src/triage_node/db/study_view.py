"""What the web interface shows of the studies: the worklist with body parts, one study's
analysed images and timeline, and the last day's activity for the dashboard's chart.

Read-only; the priority rules themselves stay in :mod:`triage_node.db.priority`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Select, func, select

from triage_node.db.engine import Aggregate
from triage_node.db.priority import RANK_ORDER, UNREPORTED_POSITIVE
from triage_node.db.schema import image_results, instances, series, studies, study_results


@dataclass(frozen=True, slots=True)
class WorklistEntry:
    rank: int
    study_uid: str
    score: float | None
    operating_point: str | None
    body_part: str
    study_date: str
    flagged_at: datetime
    escalations: int


@dataclass(frozen=True, slots=True)
class ImageEntry:
    """One image of the latest analysis: its probability, or why it was skipped."""

    sop_instance_uid: str
    path: Path  # relative to the spool root
    body_part: str
    probability: float | None
    skip_reason: str | None
    purged: bool


@dataclass(frozen=True, slots=True)
class StudyFacts:
    """The rows the study page needs besides the priority row and the outbox."""

    study_uid: str
    body_parts: tuple[str, ...]
    first_received_at: datetime
    last_received_at: datetime
    queued_at: datetime | None
    inferred_at: datetime | None
    reported_by: str | None
    model_name: str | None
    model_version: str | None
    provider: str | None
    images: tuple[ImageEntry, ...]


@dataclass(frozen=True, slots=True)
class HourOfActivity:
    start: datetime
    received: int  # studies first received
    analysed: int  # analyses finished
    flagged: int  # studies flagged positive
    mean_seconds_to_result: float | None  # last instance received -> analysis finished


class StudyView(Aggregate):
    """Read-only views of studies for the web interface."""

    @staticmethod
    def worklist_query(limit: int = 1000) -> Select[Any]:
        """Unreported positives in reading order (the partial index ``ix_studies_worklist``
        holds exactly these), each with a body part of its series."""
        body_part = (
            select(func.min(series.c.body_part))
            .where(series.c.study_id == studies.c.id, series.c.body_part != "")
            .scalar_subquery()
        )
        query = (
            select(
                studies.c.study_uid,
                studies.c.score,
                studies.c.operating_point,
                studies.c.study_date,
                studies.c.flagged_at,
                studies.c.escalations,
                body_part.label("body_part"),
            )
            .where(UNREPORTED_POSITIVE)
            .order_by(*RANK_ORDER)
            .limit(limit)
        )
        return query

    def worklist(self, limit: int = 1000) -> list[WorklistEntry]:
        """Unreported positives in reading order, each with the body parts of its series."""
        with self._connect() as conn:
            rows = conn.execute(self.worklist_query(limit)).all()
        return [
            WorklistEntry(
                rank=n,
                study_uid=r.study_uid,
                score=r.score,
                operating_point=r.operating_point,
                body_part=r.body_part or "",
                study_date=r.study_date,
                flagged_at=r.flagged_at,
                escalations=r.escalations,
            )
            for n, r in enumerate(rows, 1)
        ]

    def facts(self, study_uid: str) -> StudyFacts | None:
        with self._connect() as conn:
            study = conn.execute(select(studies).where(studies.c.study_uid == study_uid)).first()
            if study is None:
                return None
            parts = conn.execute(
                select(series.c.body_part)
                .where(series.c.study_id == study.id, series.c.body_part != "")
                .distinct()
                .order_by(series.c.body_part)
            ).all()
            latest = conn.execute(
                select(study_results)
                .where(study_results.c.study_id == study.id)
                .order_by(study_results.c.id.desc())
                .limit(1)
            ).first()
            images: list[ImageEntry] = []
            if latest is not None:
                rows = conn.execute(
                    select(
                        instances.c.sop_instance_uid,
                        instances.c.path,
                        instances.c.purged_at,
                        series.c.body_part,
                        image_results.c.probability,
                        image_results.c.skip_reason,
                    )
                    .join(instances, instances.c.id == image_results.c.instance_id)
                    .join(series, series.c.id == instances.c.series_id)
                    .where(image_results.c.study_result_id == latest.id)
                    .order_by(image_results.c.probability.desc().nulls_last(), instances.c.id)
                ).all()
                images = [
                    ImageEntry(
                        sop_instance_uid=r.sop_instance_uid,
                        path=Path(r.path),
                        body_part=r.body_part,
                        probability=r.probability,
                        skip_reason=r.skip_reason,
                        purged=r.purged_at is not None,
                    )
                    for r in rows
                ]
        return StudyFacts(
            study_uid=study.study_uid,
            body_parts=tuple(p.body_part for p in parts),
            first_received_at=study.first_received_at,
            last_received_at=study.last_received_at,
            queued_at=study.queued_at,
            inferred_at=study.inferred_at,
            reported_by=study.reported_by,
            model_name=None if latest is None else latest.model_name,
            model_version=None if latest is None else latest.model_version,
            provider=None if latest is None else latest.provider,
            images=tuple(images),
        )

    def instance_path(self, study_uid: str, sop_instance_uid: str | None = None) -> Path | None:
        """The spooled file (relative to the spool root) of an instance of the study — that
        instance, or without *sop_instance_uid* its first (for the identifiers its header
        holds) — while retention has not removed it."""
        query = (
            select(instances.c.path)
            .join(studies, studies.c.id == instances.c.study_id)
            .where(studies.c.study_uid == study_uid, instances.c.purged_at.is_(None))
            .order_by(instances.c.id)
            .limit(1)
        )
        if sop_instance_uid is not None:
            query = query.where(instances.c.sop_instance_uid == sop_instance_uid)
        with self._connect() as conn:
            row = conn.execute(query).first()
        return None if row is None else Path(row.path)

    def _hour(self, column: Any) -> Any:
        """*column*'s hour as 'YYYY-MM-DD HH' (UTC, as stored), on either backend."""
        if self.engine.dialect.name == "postgresql":
            return func.to_char(func.date_trunc("hour", column), "YYYY-MM-DD HH24")
        return func.strftime("%Y-%m-%d %H", column)

    def _seconds_between(self, later: Any, earlier: Any) -> Any:
        if self.engine.dialect.name == "postgresql":
            return func.extract("epoch", later - earlier)
        return (func.julianday(later) - func.julianday(earlier)) * 86400.0

    def activity(self, now: datetime, hours: int = 24) -> list[HourOfActivity]:
        """Received, analysed and flagged per hour over the last *hours*, oldest first; counted
        by the database, an hour a row (the dashboard asks for this on every load)."""
        end = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
        start = end - timedelta(hours=hours)
        buckets = [start + timedelta(hours=h) for h in range(hours)]
        keys = {b.strftime("%Y-%m-%d %H"): i for i, b in enumerate(buckets)}
        received = [0] * hours
        analysed = [0] * hours
        flagged = [0] * hours
        waits: list[float | None] = [None] * hours

        def counts(column: Any) -> list[tuple[str, int]]:
            hour = self._hour(column)
            query = (
                select(hour.label("hour"), func.count().label("n"))
                .where(column >= start)
                .group_by(hour)
            )
            return [(r.hour, int(r.n)) for r in conn.execute(query)]

        with self._connect() as conn:
            for key, n in counts(studies.c.first_received_at):
                if key in keys:
                    received[keys[key]] = n
            for key, n in counts(studies.c.flagged_at):
                if key in keys:
                    flagged[keys[key]] = n
            hour = self._hour(study_results.c.created_at)
            wait = self._seconds_between(study_results.c.created_at, studies.c.last_received_at)
            rows = conn.execute(
                select(hour.label("hour"), func.count().label("n"), func.avg(wait).label("wait"))
                .join(studies, studies.c.id == study_results.c.study_id)
                .where(study_results.c.created_at >= start)
                .group_by(hour)
            )
            for r in rows:
                if r.hour in keys:
                    analysed[keys[r.hour]] = int(r.n)
                    waits[keys[r.hour]] = None if r.wait is None else max(0.0, float(r.wait))
        return [
            HourOfActivity(buckets[i], received[i], analysed[i], flagged[i], waits[i])
            for i in range(hours)
        ]
