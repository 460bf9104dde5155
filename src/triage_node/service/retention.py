"""Retention: spooled instances go once their results are delivered plus ``retention.spool_days``;
a study's row goes once its files are gone and nothing happened to it for
``retention.priority_days``.

The PACS keeps the originals; the node's spool only serves re-analysis of late instances and
resends. A study waiting for a report (an unreported positive) keeps its files and its row, and
so does one whose results are not all delivered. Files are removed before the database says so:
a purge cut short by a crash is simply done again by the next round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from triage_node.config import RetentionConfig
from triage_node.db.retention import RetentionCounts, RetentionRecords
from triage_node.domain import utcnow
from triage_node.logs import get_logger, log_event
from triage_node.spool import Spool

LOG = get_logger(__name__)


class Retention:
    """One round at a time, from the service's scheduler."""

    def __init__(
        self,
        records: RetentionRecords,
        spool: Spool,
        config: RetentionConfig,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.records = records
        self.spool = spool
        self.config = config
        self.clock = clock

    def run_once(self) -> RetentionCounts:
        now = self.clock()
        spool_cutoff = now - timedelta(days=self.config.spool_days)
        purged = removed = freed = 0
        for candidate in self.records.purge_candidates(spool_cutoff, self.config.batch_size):
            files, size = self.spool.purge_study(
                candidate.study_uid, [path for _, path, _ in candidate.files]
            )
            self.records.purged(candidate.study_id, [i for i, _, _ in candidate.files], now)
            purged, removed, freed = purged + 1, removed + files, freed + size
            log_event(
                LOG,
                logging.INFO,
                "study_purged",
                "spooled files past retention removed",
                study_uid=candidate.study_uid,
                files=files,
                bytes=size,
            )
        row_cutoff = now - timedelta(days=self.config.priority_days)
        deleted = self.records.delete_old_studies(row_cutoff, self.config.batch_size)
        for study_uid in deleted:
            log_event(
                LOG,
                logging.INFO,
                "study_deleted",
                "study row past retention deleted",
                study_uid=study_uid,
            )
        counts = RetentionCounts(purged, removed, freed, len(deleted))
        self.records.record_run(now, counts, keep_runs_after=row_cutoff)
        return counts
