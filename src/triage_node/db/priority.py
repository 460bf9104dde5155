"""The priority table: each study's state, score and operating point, ranked for reading.

Priority only goes up: a later analysis keeps the highest score and operating point and never
takes a flag back; only a report does (:func:`raise_priority`, :meth:`PriorityTable.mark_reported`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    and_,
    case,
    func,
    or_,
    select,
    update,
)

from triage_node.db.engine import Aggregate
from triage_node.db.schema import (
    fit,
    image_results,
    studies,
    study_results,
)
from triage_node.domain import OPERATING_POINT_ORDER, Outcome, StudyAnalysis


class PriorityState(enum.StrEnum):
    """A study's place in the priority table (architecture.md, result contract item 4).

    RECEIVED, QUEUED and INFERRED follow the processing state; FLAGGED (a positive result, not yet
    reported) and REPORTED (a radiologist's report is known) then hold whatever happens next:
    a flag is never taken back by a later analysis, only by a report.
    """

    RECEIVED = "RECEIVED"
    QUEUED = "QUEUED"
    INFERRED = "INFERRED"
    FLAGGED = "FLAGGED"
    REPORTED = "REPORTED"


class ReportSource(enum.StrEnum):
    """How the node learnt that a study was reported, most reliable first."""

    HL7 = "hl7"  # ORU^R01 with OBR-25 F or C
    C_FIND = "c-find"  # a report object in the study that the node did not make
    QIDO_RS = "qido-rs"  # the same, found by QIDO-RS in a DICOMweb PACS
    CLI = "cli"  # triage-node mark-reported
    WEB = "web"  # "mark reported" on the study's web page (by a signed-in user)


@dataclass(frozen=True, slots=True)
class PriorityRow:
    """One study in the priority table. ``rank`` is its place among unreported positives
    (1 = read first), None for every other study."""

    study_uid: str
    state: PriorityState
    outcome: Outcome | None
    score: float | None
    operating_point: str | None
    model_version: str | None
    study_date: str
    received_at: datetime
    inferred_at: datetime | None
    flagged_at: datetime | None
    reported_at: datetime | None
    report_source: ReportSource | None
    escalations: int
    escalated_at: datetime | None
    rank: int | None = None
    skip_reason: str | None = None  # for a skipped study: why (e.g. "out of scope: ...")


# A positive result no radiologist has reported yet (the worklist; what escalation, report
# checks and retention look at).
UNREPORTED_POSITIVE = and_(studies.c.flagged_at.is_not(None), studies.c.reported_at.is_(None))
# Rank: higher score first, then the older study (architecture.md, priority table).
RANK_ORDER = (studies.c.score.desc(), studies.c.first_received_at, studies.c.id)
_PRIORITY_STATE = case(
    (studies.c.reported_at.is_not(None), PriorityState.REPORTED.value),
    (studies.c.flagged_at.is_not(None), PriorityState.FLAGGED.value),
    else_=studies.c.state,
)


def raise_priority(conn: Connection, study_id: int, analysis: StudyAnalysis, now: datetime) -> None:
    """Priority only goes up: keep the highest score and operating point; flag once."""
    score = analysis.score
    if score is None:
        return
    values: dict[str, Any] = {
        "score": case(
            (or_(studies.c.score.is_(None), studies.c.score < score), score),
            else_=studies.c.score,
        ),
        "model_version": fit(studies, "model_version", analysis.model_version),
    }
    point = analysis.operating_point
    if point is not None:
        weaker = [p.value for p in OPERATING_POINT_ORDER[: OPERATING_POINT_ORDER.index(point)]]
        values["operating_point"] = case(
            (
                or_(
                    studies.c.operating_point.is_(None),
                    studies.c.operating_point.in_(weaker),
                ),
                point.value,
            ),
            else_=studies.c.operating_point,
        )
    if analysis.outcome == Outcome.POSITIVE:
        values["flagged_at"] = func.coalesce(studies.c.flagged_at, now)
    conn.execute(update(studies).where(studies.c.id == study_id).values(**values))


class PriorityTable(Aggregate):
    """The ranked worklist of unreported positives, and every study's priority row."""

    @staticmethod
    def _row(row: Any, rank: int | None = None) -> PriorityRow:
        return PriorityRow(
            study_uid=row.study_uid,
            state=PriorityState(row.priority_state),
            outcome=None if row.outcome is None else Outcome(row.outcome),
            score=row.score,
            operating_point=row.operating_point,
            model_version=row.model_version,
            study_date=row.study_date,
            received_at=row.first_received_at,
            inferred_at=row.inferred_at,
            flagged_at=row.flagged_at,
            reported_at=row.reported_at,
            report_source=None if row.report_source is None else ReportSource(row.report_source),
            escalations=row.escalations,
            escalated_at=row.escalated_at,
            rank=rank,
        )

    def _query(self) -> Any:
        return select(studies, _PRIORITY_STATE.label("priority_state"))

    def worklist(self, limit: int = 1000) -> list[PriorityRow]:
        """Unreported positives, ranked: the order a radiologist should read them in."""
        query = self._query().where(UNREPORTED_POSITIVE).order_by(*RANK_ORDER).limit(limit)
        with self._connect() as conn:
            return [self._row(r, n) for n, r in enumerate(conn.execute(query), 1)]

    def row(self, study_uid: str) -> PriorityRow | None:
        """One study's priority row (with its rank when it is an unreported positive)."""
        ranked = (
            select(
                studies.c.id,
                func.row_number().over(order_by=RANK_ORDER).label("rank"),
            )
            .where(UNREPORTED_POSITIVE)
            .subquery()
        )
        query = (
            self._query()
            .add_columns(ranked.c.rank)
            .outerjoin(ranked, ranked.c.id == studies.c.id)
            .where(studies.c.study_uid == study_uid)
        )
        with self._connect() as conn:
            row = conn.execute(query).one_or_none()
            if row is None:
                return None
            found = self._row(row, row.rank)
            if found.outcome == Outcome.SKIPPED:
                found = replace(found, skip_reason=self._skip_reason(conn, row.id))
        return found

    @staticmethod
    def _skip_reason(conn: Connection, study_id: int) -> str | None:
        """Why the study's latest analysis analysed nothing: its images' most common reason."""
        latest = (
            select(func.max(study_results.c.id))
            .where(study_results.c.study_id == study_id)
            .scalar_subquery()
        )
        reasons = conn.execute(
            select(image_results.c.skip_reason, func.count().label("n"))
            .where(image_results.c.study_result_id == latest)
            .where(image_results.c.skip_reason.is_not(None))
            .group_by(image_results.c.skip_reason)
            .order_by(func.count().desc(), image_results.c.skip_reason)
            .limit(1)
        ).first()
        return None if reasons is None else str(reasons.skip_reason)

    def oldest_unreported_flag(self) -> datetime | None:
        """When the longest-waiting unreported positive was flagged."""
        with self._connect() as conn:
            oldest: datetime | None = conn.execute(
                select(func.min(studies.c.flagged_at)).where(UNREPORTED_POSITIVE)
            ).scalar_one()
        return oldest

    def counts(self) -> dict[str, int]:
        """Studies by priority state."""
        query = select(_PRIORITY_STATE, func.count()).group_by(_PRIORITY_STATE)
        with self._connect() as conn:
            return {str(state): int(n) for state, n in conn.execute(query)}

    def mark_reported(
        self,
        source: ReportSource,
        now: datetime,
        *,
        study_uid: str | None = None,
        accession_number: str | None = None,
        reported_by: str | None = None,
    ) -> list[tuple[str, bool]]:
        """Record that a study (by UID, or every study of an accession number) was reported
        (*reported_by*: the web user who said so).

        Returns (study UID, newly reported) for each study found; an empty list when none was.
        """
        if (study_uid is None) == (accession_number is None):
            raise ValueError("give exactly one of study_uid and accession_number")
        match = (
            studies.c.study_uid == study_uid
            if study_uid is not None
            else studies.c.accession_number
            == fit(studies, "accession_number", accession_number or "")
        )
        with self._begin() as conn:
            found = conn.execute(
                select(studies.c.id, studies.c.study_uid, studies.c.reported_at).where(match)
            ).all()
            fresh = [r.id for r in found if r.reported_at is None]
            if fresh:
                conn.execute(
                    update(studies)
                    .where(studies.c.id.in_(fresh), studies.c.reported_at.is_(None))
                    .values(
                        reported_at=now,
                        report_source=source.value,
                        reported_by=None
                        if reported_by is None
                        else fit(studies, "reported_by", reported_by),
                    )
                )
        return [(r.study_uid, r.reported_at is None) for r in found]
