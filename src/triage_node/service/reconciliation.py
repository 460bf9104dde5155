"""Report status: which flagged studies a radiologist has reported (architecture.md, "Report
status"). Two feeds write it: a periodic C-FIND in the PACS for report objects the node did not
make, and HL7 v2 ORU^R01 messages from the RIS. ``triage-node mark-reported`` is the third.
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from pydicom.uid import (
    UID,
    EncapsulatedPDFStorage,
)

from triage_node.config import Config, ReconcileConfig
from triage_node.db.outbox import Outbox
from triage_node.db.priority import PriorityTable, ReportSource
from triage_node.db.report_checks import ReportChecks
from triage_node.dicom.find_scu import (
    PacsObject,
    PacsSeries,
    QueryFailed,
    StudyContents,
    study_contents,
)
from triage_node.dicomweb.qido import study_contents_qido
from triage_node.dicomweb.stow_client import WebCredentials
from triage_node.domain import WebDestination, parse_destination, utcnow
from triage_node.errors import DatabaseUnavailable
from triage_node.hl7.messages import (
    APPLICATION_INTERNAL_ERROR,
    UNSUPPORTED_MESSAGE_TYPE,
    HL7Error,
    Message,
    ReportNotice,
    acknowledgement,
    parse,
    report_notices,
)
from triage_node.logs import get_logger, log_event

LOG = get_logger(__name__)

_SR_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."  # every SR Storage SOP class (PS3.4 A.35)


class ReportRules:
    """Which objects in a study are a radiologist's report."""

    def __init__(self, config: ReconcileConfig) -> None:
        self.modalities = {m.strip().upper() for m in config.report_modalities if m.strip()}
        self.descriptions = [p.strip().upper() for p in config.report_series_descriptions]

    def series_rule(self, series: PacsSeries) -> bool:
        """The configured modality / series description rules."""
        description = series.description.upper()
        return series.modality in self.modalities or any(
            fnmatch.fnmatchcase(description, pattern) for pattern in self.descriptions
        )

    def why_report(self, obj: PacsObject) -> str | None:
        """Why *obj* is a report, or None when it is not one."""
        sop_class = obj.sop_class_uid
        if sop_class.startswith(_SR_SOP_CLASS_PREFIX):
            if obj.completion_flag == "COMPLETE":
                return "SR with Completion Flag COMPLETE"
            if obj.verification_flag == "VERIFIED":
                return "SR with Verification Flag VERIFIED"
        if sop_class == EncapsulatedPDFStorage:
            return "Encapsulated PDF"
        if self.series_rule(obj.series):
            return f"series rule (modality {obj.series.modality})"
        return None

    def find_report(self, contents: StudyContents, own: set[str]) -> str | None:
        """The reason the first report found gives, ignoring the node's own objects."""
        for obj in contents.objects:
            if obj.sop_instance_uid in own:
                continue
            reason = self.why_report(obj)
            if reason is not None:
                return f"{reason}: {UID(obj.sop_class_uid).name}"
        return None


class PacsReconciler:
    """Looks up unreported positives in the PACS (C-FIND) and marks the reported ones."""

    def __init__(
        self,
        checks: ReportChecks,
        priority: PriorityTable,
        outbox: Outbox,
        config: Config,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.checks = checks
        self.priority = priority
        self.outbox = outbox
        self.config = config.reconcile
        self.pacs = parse_destination(self.config.pacs) if self.config.pacs else None
        self.source = (
            ReportSource.QIDO_RS if isinstance(self.pacs, WebDestination) else ReportSource.C_FIND
        )
        self.web_credentials = WebCredentials.from_config(config.delivery)
        self.calling_ae = config.dicom.ae_title
        self.tls = config.delivery.tls
        self.rules = ReportRules(self.config)
        self.clock = clock

    def _contents(self, study_uid: str) -> StudyContents:
        """What the PACS holds: by QIDO-RS for a DICOMweb PACS, else by C-FIND."""
        assert self.pacs is not None
        if isinstance(self.pacs, WebDestination):
            return study_contents_qido(
                self.pacs,
                study_uid,
                credentials=self.web_credentials,
                timeout=self.config.timeout_seconds,
                tls=self.tls,
                look_inside=self.rules.series_rule,
            )
        return study_contents(
            self.pacs,
            study_uid,
            calling_ae=self.calling_ae,
            timeout=self.config.timeout_seconds,
            tls=self.tls,
            look_inside=self.rules.series_rule,
        )

    def reconcile_once(self) -> int:
        """One round; returns how many studies were found reported."""
        if self.pacs is None:
            return 0
        now = self.clock()
        every = timedelta(seconds=self.config.recheck_seconds)
        found = 0
        for study_id, study_uid in self.checks.due(now, every, self.config.batch_size):
            try:
                contents = self._contents(study_uid)
            except QueryFailed as exc:
                log_event(
                    LOG,
                    logging.WARNING,
                    "reconcile_failed",
                    "cannot ask the PACS for reports; trying again next round",
                    pacs=str(self.pacs),
                    error=str(exc),
                )
                return found
            self.checks.checked(study_id, self.clock())
            if not contents.found:
                log_event(
                    LOG,
                    logging.INFO,
                    "reconcile_study_missing",
                    "the PACS does not hold the study (yet)",
                    study_uid=study_uid,
                    pacs=str(self.pacs),
                )
                continue
            reason = self.rules.find_report(contents, self.outbox.objects_of(study_id))
            if reason is None:
                continue
            marked = self.priority.mark_reported(self.source, self.clock(), study_uid=study_uid)
            if any(newly for _, newly in marked):
                found += 1
                log_event(
                    LOG,
                    logging.INFO,
                    "study_reported",
                    "report found in the PACS",
                    study_uid=study_uid,
                    source=self.source.value,
                    reason=reason,
                )
        return found


class OruHandler:
    """Answers each HL7 message of the MLLP listener: ORU^R01 with OBR-25 F or C marks the
    matching studies reported (by ZDS study UID, else by accession number)."""

    def __init__(self, priority: PriorityTable, accession_fields: list[str]) -> None:
        self.priority = priority
        self.accession_fields = accession_fields
        self._ids = itertools.count(1)

    def __call__(self, raw: bytes) -> bytes:
        now = utcnow()
        control_id = f"TN{now:%Y%m%d%H%M%S}{next(self._ids)}"
        message: Message | None = None
        try:
            message = parse(_decode(raw))
            notices = report_notices(message, self.accession_fields)
        except HL7Error as exc:
            # AR (HL7 v2.5.1 2.9.2): not HL7, or a message type this listener does not take;
            # AE: an ORU^R01 whose content cannot be used.
            rejected = message is None or exc.code == UNSUPPORTED_MESSAGE_TYPE
            code = "AR" if rejected else "AE"
            log_event(
                LOG,
                logging.WARNING,
                "hl7_rejected",
                "HL7 message not processed",
                ack=code,
                error=str(exc),
                control_id=message.control_id if message else "",
            )
            ack = acknowledgement(message, code, str(exc), now, control_id, exc.code)
            return ack.encode("utf-8")
        try:
            matched, changed = self._apply(notices, now)
        except DatabaseUnavailable as exc:
            # AE with 207: nothing was recorded; the RIS keeps the message and sends it again.
            log_event(
                LOG, logging.ERROR, "hl7_failed", "database unavailable", error=str(exc)[:200]
            )
            text = "database unavailable; send again later"
            return acknowledgement(
                message, "AE", text, now, control_id, APPLICATION_INTERNAL_ERROR
            ).encode("utf-8")
        log_event(
            LOG,
            logging.INFO,
            "hl7_accepted",
            "ORU^R01 processed",
            control_id=message.control_id,
            orders=len(notices),
            studies_matched=matched,
            studies_reported=changed,
        )
        text = f"{changed} stud{'y' if changed == 1 else 'ies'} marked reported"
        return acknowledgement(message, "AA", text, now, control_id).encode("utf-8")

    def _apply(self, notices: list[ReportNotice], now: datetime) -> tuple[int, int]:
        """Mark the studies of final/corrected notices; returns (studies matched, newly marked)."""
        changed = matched = 0
        for notice in notices:
            if not notice.reported:
                continue
            if notice.study_uid:
                marked = self.priority.mark_reported(
                    ReportSource.HL7, now, study_uid=notice.study_uid
                )
            else:
                marked = []
            if not marked and notice.accession_number:
                marked = self.priority.mark_reported(
                    ReportSource.HL7, now, accession_number=notice.accession_number
                )
            matched += len(marked)
            for study_uid, newly in marked:
                if newly:
                    changed += 1
                    log_event(
                        LOG,
                        logging.INFO,
                        "study_reported",
                        "report received from the RIS",
                        study_uid=study_uid,
                        source=ReportSource.HL7.value,
                        result_status=notice.result_status,
                    )
        return matched, changed


def _decode(raw: bytes) -> str:
    """HL7 v2 text is ASCII or ISO 8859-1 unless MSH-18 says UTF-8; UTF-8 is tried first."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")
