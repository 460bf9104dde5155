"""Delivering the outbox: due result objects to their destinations, with retries.

Run by the service's scheduler every ``delivery.interval_seconds``, in one process, so items are
not claimed. Per destination, due items go over one association (``delivery.batch_size`` at
most), or for a DICOMweb destination in one STOW-RS request per study. A Success or Warning
marks an item SENT; anything else is retried after an exponential
backoff with jitter (``retry_backoff_seconds`` doubling up to ``retry_max_seconds``, times
0.5-1.5), and after ``max_attempts`` the item is DEAD until ``triage-node outbox retry``.
A destination that is down only delays its own items: receiving and analysis go on.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from triage_node.config import DeliveryConfig
from triage_node.db.outbox import Outbox, OutboxItem, OutboxState
from triage_node.dicom.status import DeliveryOutcome
from triage_node.dicom.storage_scu import Sent, send_files
from triage_node.dicomweb.stow_client import WebCredentials, send_files_stow
from triage_node.domain import Destination, WebDestination, parse_destination, utcnow
from triage_node.logs import get_logger, log_event
from triage_node.service.backoff import exponential_backoff

LOG = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Round:
    sent: int = 0
    retrying: int = 0
    dead: int = 0


class OutboxDelivery:
    def __init__(
        self,
        outbox: Outbox,
        config: DeliveryConfig,
        calling_ae: str,
        *,
        clock: Callable[[], datetime] = utcnow,
        rng: random.Random | None = None,
    ) -> None:
        self.outbox = outbox
        self.config = config
        self.calling_ae = calling_ae
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self.web_credentials = WebCredentials.from_config(config)

    def deliver_due(self) -> Round:
        """Send what is due now; the counts of this round."""
        due = self.outbox.due(self.clock(), self.config.batch_size)
        by_destination: dict[str, list[OutboxItem]] = {}
        for item in due:
            by_destination.setdefault(item.destination, []).append(item)
        totals = Round()
        for destination, items in by_destination.items():
            result = self._send(destination, items)
            totals = Round(
                totals.sent + result.sent,
                totals.retrying + result.retrying,
                totals.dead + result.dead,
            )
        return totals

    def _send_files(self, paths: list[Path], target: Destination | WebDestination) -> list[Sent]:
        if isinstance(target, WebDestination):  # STOW-RS
            return send_files_stow(
                paths,
                target,
                credentials=self.web_credentials,
                timeout=self.config.timeout_seconds,
                tls=self.config.tls,
            )
        return send_files(  # C-STORE
            paths,
            target,
            calling_ae=self.calling_ae,
            timeout=self.config.timeout_seconds,
            tls=self.config.tls,
        )

    def _send(self, destination: str, items: list[OutboxItem]) -> Round:
        outcomes: list[tuple[OutboxItem, int | None, str, bool]]
        try:
            target = parse_destination(destination)
        except ValueError as exc:
            outcomes = [(item, None, str(exc), False) for item in items]
        else:
            sent = self._send_files([item.path for item in items], target)
            outcomes = [
                (item, s.status, s.detail or s.outcome, s.outcome == DeliveryOutcome.SENT)
                for item, s in zip(items, sent, strict=True)
            ]
            if any(s.outcome == DeliveryOutcome.UNREACHABLE for s in sent):
                log_event(
                    LOG,
                    logging.WARNING,
                    "destination_unreachable",
                    "destination did not accept an association; results wait",
                    destination=destination,
                    waiting=len(items),
                )
        sent_count = retrying = dead = 0
        now = self.clock()
        for item, status, detail, ok in outcomes:
            if ok:
                self.outbox.sent(item.id, status or 0, now)
                sent_count += 1
                log_event(
                    LOG,
                    logging.INFO,
                    "result_sent",
                    "result object stored by the destination",
                    destination=destination,
                    study_uid=item.study_uid,
                    sop_instance_uid=item.sop_instance_uid,
                    kind=item.kind,
                    status=f"0x{(status or 0):04X}",
                )
                continue
            state = self.outbox.failed(
                item.id,
                status,
                detail,
                retry_at=now
                + exponential_backoff(
                    self.config.retry_backoff_seconds,
                    item.attempts + 1,
                    cap=self.config.retry_max_seconds,
                    rng=self.rng,
                ),
                max_attempts=self.config.max_attempts,
            )
            if state == OutboxState.DEAD:
                dead += 1
            else:
                retrying += 1
            log_event(
                LOG,
                logging.ERROR if state == OutboxState.DEAD else logging.WARNING,
                "result_dead" if state == OutboxState.DEAD else "result_retry",
                f"result not stored: {detail[:200]}",
                destination=destination,
                study_uid=item.study_uid,
                sop_instance_uid=item.sop_instance_uid,
                kind=item.kind,
                status="-" if status is None else f"0x{status:04X}",
                attempt=item.attempts + 1,
            )
        return Round(sent_count, retrying, dead)
