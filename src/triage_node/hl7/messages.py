"""HL7 v2 messages: parsing, report notices of ORU^R01, acknowledgements, and the RIS priority
update of an escalation. Pure functions on text; the MLLP wire is in ``mllp``.

HL7 v2.5.1 Chapter 2 (control): segments end with CR, MSH-1 is the field separator and MSH-2 the
encoding characters; fields are counted from 1 after the segment name (MSH-1 being the separator).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from triage_node.domain import field_name
from triage_node.errors import TriageError

# HL7 table 0357 (message error condition codes) that this node answers with.
SEGMENT_SEQUENCE_ERROR = "100"
REQUIRED_FIELD_MISSING = "101"
UNSUPPORTED_MESSAGE_TYPE = "200"
APPLICATION_INTERNAL_ERROR = "207"

# OBR-25 result status (HL7 table 0123): final and corrected results are a finished report.
REPORTED_STATUSES = frozenset({"F", "C"})

MAX_FIELD_TEXT = 199  # what an ACK's error text may carry


class HL7Error(TriageError):
    """The HL7 message cannot be processed."""

    def __init__(self, message: str, code: str = REQUIRED_FIELD_MISSING) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Separators:
    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"

    @property
    def encoding(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent

    def unescape(self, value: str) -> str:
        """Resolve the escape sequences \\F\\ \\S\\ \\T\\ \\R\\ \\E\\ (HL7 v2.5.1 2.7.4)."""
        if self.escape not in value:
            return value
        e = self.escape
        for code, char in (
            ("F", self.field),
            ("S", self.component),
            ("T", self.subcomponent),
            ("R", self.repetition),
        ):
            value = value.replace(f"{e}{code}{e}", char)
        return value.replace(f"{e}E{e}", e)

    def escaped(self, value: str) -> str:
        """*value* made safe to place in one component."""
        e = self.escape
        value = value.replace(e, f"{e}E{e}")
        for code, char in (
            ("F", self.field),
            ("S", self.component),
            ("T", self.subcomponent),
            ("R", self.repetition),
        ):
            value = value.replace(char, f"{e}{code}{e}")
        return value.replace("\r", " ").replace("\n", " ")


@dataclass(frozen=True, slots=True)
class Segment:
    name: str
    fields: tuple[str, ...]  # fields[n] is field n (fields[0] is the name)

    def field(self, number: int) -> str:
        return self.fields[number] if number < len(self.fields) else ""


@dataclass(frozen=True, slots=True)
class Message:
    """A parsed message. It exists only if it has a usable MSH with a message type."""

    segments: tuple[Segment, ...]
    separators: Separators

    @property
    def header(self) -> Segment:
        return self.segments[0]

    @property
    def message_type(self) -> tuple[str, str]:
        """(MSH-9.1, MSH-9.2), e.g. ("ORU", "R01")."""
        parts = self.header.field(9).split(self.separators.component)
        return parts[0].strip().upper(), (parts[1].strip().upper() if len(parts) > 1 else "")

    @property
    def control_id(self) -> str:
        return self.header.field(10)

    @property
    def version(self) -> str:
        return self.header.field(12).split(self.separators.component)[0] or "2.5.1"

    def all(self, name: str) -> list[Segment]:
        return [s for s in self.segments if s.name == name]

    def component(self, segment: Segment, number: int, component: int = 1) -> str:
        """Field *number*, its first repetition, component *component*, unescaped."""
        sep = self.separators
        value = segment.field(number).split(sep.repetition)[0]
        parts = value.split(sep.component)
        chosen = parts[component - 1] if component <= len(parts) else ""
        return sep.unescape(chosen.split(sep.subcomponent)[0]).strip()


def parse(text: str) -> Message:
    """Parse one message; :class:`HL7Error` when it has no usable MSH segment."""
    lines = [line for line in re.split(r"\r\n|\r|\n", text) if line.strip()]
    if not lines or not lines[0].startswith("MSH") or len(lines[0]) < 8:
        raise HL7Error("the message does not start with an MSH segment", SEGMENT_SEQUENCE_ERROR)
    header = lines[0]
    field_sep, encoding = header[3], header[4:8]
    if field_sep.isalnum() or len(set(encoding)) != 4 or field_sep in encoding:
        raise HL7Error("MSH-1/MSH-2 do not declare usable separators", REQUIRED_FIELD_MISSING)
    separators = Separators(field_sep, encoding[0], encoding[1], encoding[2], encoding[3])
    segments = []
    for number, line in enumerate(lines):
        parts = line.split(field_sep)
        name = parts[0]
        if not re.fullmatch(r"[A-Z][A-Z0-9]{2}", name):
            raise HL7Error(f"segment {number + 1} has no valid name", SEGMENT_SEQUENCE_ERROR)
        if name == "MSH":
            # MSH-1 is the separator itself, so MSH-n is parts[n - 1].
            parts = ["MSH", field_sep, *parts[1:]]
        segments.append(Segment(name, tuple(parts)))
    message = Message(tuple(segments), separators)
    if not message.message_type[0]:
        raise HL7Error("MSH-9 (message type) is empty", REQUIRED_FIELD_MISSING)
    if not message.control_id:
        raise HL7Error("MSH-10 (message control id) is empty", REQUIRED_FIELD_MISSING)
    return message


@dataclass(frozen=True, slots=True)
class ReportNotice:
    """One order's result status from an ORU^R01 (the accession number is never logged)."""

    accession_number: str
    study_uid: str  # from ZDS-1 when the sender gives one (IHE), else ""
    result_status: str  # OBR-25

    @property
    def reported(self) -> bool:
        return self.result_status in REPORTED_STATUSES


def report_notices(message: Message, accession_fields: list[str]) -> list[ReportNotice]:
    """The result status of every OBR of an ORU^R01.

    The accession number is the first non-empty of *accession_fields* (``OBR-18``, ``OBR-3``,
    ``ORC-3``...), looked up in the OBR or in the ORC that comes before it.
    """
    if message.message_type != ("ORU", "R01"):
        kind = "^".join(part for part in message.message_type if part)
        raise HL7Error(f"message type {kind} is not ORU^R01", UNSUPPORTED_MESSAGE_TYPE)
    wanted = [field_name(name) for name in accession_fields]
    study_uid = ""
    for zds in message.all("ZDS"):
        study_uid = message.component(zds, 1)
    notices: list[ReportNotice] = []
    order: Segment | None = None
    for segment in message.segments:
        if segment.name == "ORC":
            order = segment
        if segment.name != "OBR":
            continue
        accession = ""
        for name, number in wanted:
            source = segment if name == "OBR" else order if name == "ORC" else None
            if source is not None and (accession := message.component(source, number)):
                break
        status = message.component(segment, 25).upper()
        if not accession and not study_uid:
            raise HL7Error(
                f"OBR {len(notices) + 1} names no accession number "
                f"({', '.join(accession_fields)}) and there is no ZDS study UID",
                REQUIRED_FIELD_MISSING,
            )
        if not status:
            raise HL7Error(f"OBR {len(notices) + 1} has no result status (OBR-25)")
        notices.append(ReportNotice(accession, study_uid, status))
    if not notices:
        raise HL7Error("the ORU^R01 holds no OBR segment", SEGMENT_SEQUENCE_ERROR)
    return notices


def _timestamp(now: datetime) -> str:
    return now.strftime("%Y%m%d%H%M%S")


def acknowledgement(
    message: Message | None,
    code: str,
    text: str,
    now: datetime,
    control_id: str,
    error_code: str | None = None,
) -> str:
    """An ACK (HL7 v2.5.1 2.14.1) for *message*, or a bare one when it could not be parsed.

    *code*: AA (accepted), AE (application error: look at it), AR (rejected: do not resend as is).
    """
    sep = message.separators if message is not None else Separators()
    f = sep.field
    if message is not None:
        h = message.header
        # The sender becomes the receiver and the other way round.
        route = [h.field(5), h.field(6), h.field(3), h.field(4)]
        trigger, their_id, version = message.message_type[1], message.control_id, message.version
    else:
        route, trigger, their_id, version = ["", "", "", ""], "", "", "2.5.1"
    msh = [
        "MSH",
        sep.encoding,
        *route,
        _timestamp(now),
        "",
        f"ACK{sep.component}{trigger}{sep.component}ACK",
        control_id,
        "P",
        version,
    ]
    segments = [
        f.join(msh),
        f.join(["MSA", code, their_id, sep.escaped(text[:MAX_FIELD_TEXT])]),
    ]
    if error_code is not None:
        c = sep.component
        condition = f"{error_code}{c}{sep.escaped(text[:MAX_FIELD_TEXT])}{c}HL70357"
        segments.append(f.join(["ERR", "", "", condition, "E"]))
    return "\r".join(segments) + "\r"


def _segment(field_separator: str, name: str, values: dict[int, str]) -> str:
    """A segment with the given fields set (1-based) and the others empty."""
    fields = [""] * max(values)
    for number, value in values.items():
        fields[number - 1] = value
    return field_separator.join([name, *fields])


def priority_update(
    *,
    accession_number: str,
    study_uid: str,
    sending_application: str,
    receiving_application: str,
    control_id: str,
    now: datetime,
) -> str:
    """An ORM^O01 order update (ORC-1 XO) raising the order's priority to STAT.

    The order is named by its accession number (OBR-18 and OBR-3, the fields a RIS matches an
    imaging order on in IHE Scheduled Workflow) and the study by ZDS-1; the priority is component
    6 of the quantity/timing fields ORC-7 and OBR-27 (HL7 v2.3.1 4.4).
    """
    sep = Separators()
    f, c = sep.field, sep.component
    accession = sep.escaped(accession_number)
    stat = c * 5 + "S"
    segments = [
        f.join(
            [
                "MSH",
                sep.encoding,
                sep.escaped(sending_application),
                "",
                sep.escaped(receiving_application),
                "",
                _timestamp(now),
                "",
                f"ORM{c}O01",
                control_id,
                "P",
                "2.3.1",
            ]
        ),
        _segment(f, "ORC", {1: "XO", 3: accession, 7: stat}),
        _segment(f, "OBR", {1: "1", 3: accession, 18: accession, 27: stat}),
        _segment(f, "ZDS", {1: f"{study_uid}{c}{c}Application{c}DICOM"}),
    ]
    return "\r".join(segments) + "\r"
