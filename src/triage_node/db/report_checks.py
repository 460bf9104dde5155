"""Report checks: which unreported positives are due to be looked up in the PACS (C-FIND), and
when each was last looked up.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import (
    or_,
    select,
    update,
)

from triage_node.db.engine import Aggregate
from triage_node.db.priority import UNREPORTED_POSITIVE
from triage_node.db.schema import studies


class ReportChecks(Aggregate):
    """When each unreported positive was last looked up in the PACS."""

    def due(self, now: datetime, every: timedelta, limit: int) -> list[tuple[int, str]]:
        """Unreported positives not looked up in the PACS for *every*; least recently first."""
        query = (
            select(studies.c.id, studies.c.study_uid)
            .where(
                UNREPORTED_POSITIVE,
                or_(studies.c.checked_at.is_(None), studies.c.checked_at <= now - every),
            )
            .order_by(studies.c.checked_at.is_not(None), studies.c.checked_at, studies.c.id)
            .limit(limit)
        )
        with self._connect() as conn:
            return [(int(r.id), str(r.study_uid)) for r in conn.execute(query)]

    def checked(self, study_id: int, now: datetime) -> None:
        with self._begin() as conn:
            conn.execute(update(studies).where(studies.c.id == study_id).values(checked_at=now))
