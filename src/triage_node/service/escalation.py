"""Escalation: positives still unreported after ``escalation.after_seconds`` get their KOS flag
sent to the PACS again, the escalation counted and logged, and (when a RIS is configured) an
HL7 ORM^O01 raising the order's priority to STAT. Repeated every ``repeat_seconds`` until a
report is known.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from triage_node.config import Config
from triage_node.db.escalation import EscalationDue, Escalations
from triage_node.domain import utcnow
from triage_node.hl7.messages import HL7Error, parse, priority_update
from triage_node.hl7.mllp import MLLPError, send
from triage_node.logs import get_logger, log_event

LOG = get_logger(__name__)


class Escalator:
    def __init__(
        self, escalations: Escalations, config: Config, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self.escalations = escalations
        self.config = config.escalation
        self.application = config.dicom.ae_title
        self.clock = clock
        self._ids = itertools.count(1)

    def escalate_due(self) -> int:
        """Escalate every study that is due; returns how many were escalated."""
        if self.config.after_seconds <= 0:
            return 0
        now = self.clock()
        after = timedelta(seconds=self.config.after_seconds)
        repeat = timedelta(seconds=self.config.repeat_seconds)
        done = 0
        for due in self.escalations.due(now, after, repeat):
            resent = self.escalations.escalate(due, now)
            if resent is None:
                continue  # reported or escalated meanwhile
            done += 1
            log_event(
                LOG,
                logging.WARNING,
                "study_escalated",
                "positive study still unreported",
                study_uid=due.study_uid,
                escalation=due.escalations + 1,
                flag_objects_resent=resent,
            )
            if self.config.ris:
                self._tell_ris(due, now)
        return done

    def _tell_ris(self, due: EscalationDue, now: datetime) -> None:
        host, _, port = self.config.ris.rpartition(":")
        control_id = f"TNESC{now:%Y%m%d%H%M%S}{next(self._ids)}"
        message = priority_update(
            accession_number=due.accession_number,
            study_uid=due.study_uid,
            sending_application=self.application,
            receiving_application=self.config.ris_application,
            control_id=control_id,
            now=now,
        )
        try:
            answer = send(host, int(port), message.encode("utf-8"), self.config.timeout_seconds)
            ack = parse(answer.decode("utf-8", errors="replace"))
            code = ack.component(ack.all("MSA")[0], 1) if ack.all("MSA") else ""
        except (MLLPError, HL7Error) as exc:
            code, detail = "", str(exc)
        else:
            detail = "" if code in ("AA", "CA") else f"RIS answered {code or 'no MSA'}"
        log_event(
            LOG,
            logging.INFO if not detail else logging.WARNING,
            "ris_priority_update" if not detail else "ris_priority_update_failed",
            "priority update sent to the RIS" if not detail else "RIS priority update failed",
            study_uid=due.study_uid,
            ris=self.config.ris,
            control_id=control_id,
            ack=code,
            error=detail,
        )
