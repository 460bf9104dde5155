"""Escalation: unreported positives flagged too long ago, and one more escalation of each (its
KOS back in the outbox, in the same transaction).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import (
    or_,
    select,
    update,
)

from triage_node.db.engine import Aggregate
from triage_node.db.outbox import Outbox
from triage_node.db.priority import RANK_ORDER, UNREPORTED_POSITIVE
from triage_node.db.schema import studies


@dataclass(frozen=True, slots=True)
class EscalationDue:
    """An unreported positive due for escalation. The accession number is for the RIS message
    only (never logged)."""

    study_id: int
    study_uid: str
    accession_number: str
    escalations: int
    escalated_at: datetime | None


class Escalations(Aggregate):
    """Unreported positives due for escalation, and escalating them."""

    def due(
        self, now: datetime, after: timedelta, repeat: timedelta, limit: int = 100
    ) -> list[EscalationDue]:
        """Unreported positives flagged longer than *after* and not escalated within *repeat*."""
        query = (
            select(
                studies.c.id,
                studies.c.study_uid,
                studies.c.accession_number,
                studies.c.escalations,
                studies.c.escalated_at,
            )
            .where(
                UNREPORTED_POSITIVE,
                studies.c.flagged_at <= now - after,
                or_(studies.c.escalated_at.is_(None), studies.c.escalated_at <= now - repeat),
            )
            .order_by(*RANK_ORDER)
            .limit(limit)
        )
        with self._connect() as conn:
            return [
                EscalationDue(
                    study_id=r.id,
                    study_uid=r.study_uid,
                    accession_number=r.accession_number,
                    escalations=r.escalations,
                    escalated_at=r.escalated_at,
                )
                for r in conn.execute(query)
            ]

    def escalate(self, due: EscalationDue, now: datetime) -> int | None:
        """Count one escalation and put the study's latest KOS back in the outbox.

        Returns how many outbox items were re-queued, or None when the study changed meanwhile
        (reported, or escalated by another process).
        """
        with self._begin() as conn:
            counted = conn.execute(
                update(studies)
                .where(
                    studies.c.id == due.study_id,
                    studies.c.reported_at.is_(None),
                    studies.c.escalations == due.escalations,
                )
                .values(escalations=studies.c.escalations + 1, escalated_at=now)
            )
            if counted.rowcount != 1:
                return None
            resent = Outbox.resend_latest_kos(conn, due.study_id, now)
        return resent
