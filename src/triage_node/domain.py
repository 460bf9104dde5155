"""Values shared along the data path: UIDs, states, and the frozen records passed between layers."""

from __future__ import annotations

import enum
import re
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from triage_node import __version__
from triage_node.errors import InvalidUID

MANUFACTURER = "triage-node"  # on every object the node writes; how it knows its own outputs

# The node's DICOM implementation identity (PS3.7 D.3.3.2), in the associations it requests and
# accepts and in the File Meta of every file it writes: one class UID ("2.25." and the UUID
# 8b50d565-5e05-544e-a104-1c15d39c45ec, named from triage-node's namespace, PS3.5 B.2) and a
# version name for the release, cut to the 16 characters PS3.7 allows.
IMPLEMENTATION_CLASS_UID = "2.25.185182403347174117971947556623397701100"
IMPLEMENTATION_VERSION_NAME = f"TRIAGENODE_{__version__}"[:16]


def utcnow() -> datetime:
    """Now, timezone-aware UTC: the only kind of time the node stores."""
    return datetime.now(UTC)


# PS3.5 Section 9.1: components of digits separated by ".", at most 64 characters.
# Leading zeros are not allowed by the standard but occur in the wild; they are harmless in a
# path, so only the character set and length are enforced (that is what keeps paths safe).
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
UID_MAX_LENGTH = 64


def is_valid_uid(value: object) -> bool:
    """True when *value* is a string a DICOM UID may be (digits and dots, 1-64 characters)."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= UID_MAX_LENGTH
        and _UID_RE.fullmatch(value) is not None
    )


def validate_uid(value: object, what: str) -> str:
    """Return *value* if it is a valid UID, else raise :class:`InvalidUID` naming *what*."""
    if not is_valid_uid(value):
        shown = repr(value)[:80]
        raise InvalidUID(f"{what} is not a valid UID: {shown}")
    return str(value)


class Outcome(enum.StrEnum):
    """What the analysis of a study found (architecture.md, result contract item 4)."""

    POSITIVE = "positive"  # at or above the high-sensitivity threshold
    NEGATIVE = "negative"
    FAILED = "failed"  # the job ran out of attempts
    SKIPPED = "skipped"  # no instance the model is for


class OperatingPointName(enum.StrEnum):
    """The operating points of a manifest (architecture.md, result contract item 3)."""

    HIGH_SENSITIVITY = "high_sensitivity"  # its threshold decides the flag
    HIGH_SPECIFICITY = "high_specificity"


# Weakest first: priority compares operating points by this order. The one list of them.
OPERATING_POINT_ORDER = tuple(OperatingPointName)


class ResultKind(enum.StrEnum):
    """The result objects the node writes into a study (architecture.md, "result contract")."""

    SR = "sr"  # Comprehensive 3D SR, TID 1500 measurement report
    SC = "sc"  # Secondary Capture: the heatmap of one image
    KO = "ko"  # Key Object Selection of the positive images


_DESTINATION = re.compile(r"^(?P<ae>[^@\\]{1,16})@(?P<host>[^:@\s]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True, slots=True)
class Destination:
    """A PACS to send results to: ``AE_TITLE@host:port``, or ``...+tls`` for DICOM TLS."""

    ae_title: str
    host: str
    port: int
    tls: bool = False

    @classmethod
    def parse(cls, text: str) -> Destination:
        raw = text.strip()
        tls = raw.endswith("+tls")
        match = _DESTINATION.match(raw.removesuffix("+tls"))
        if match is None or not 0 < int(match["port"]) < 65536 or not match["ae"].strip():
            raise ValueError(f"{text!r} is not AE_TITLE@host:port (optionally +tls)")
        return cls(match["ae"].strip(), match["host"], int(match["port"]), tls)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}" + ("+tls" if self.tls else "")


@dataclass(frozen=True, slots=True)
class WebDestination:
    """A DICOMweb origin server to send results to by STOW-RS: its base URL (``http://`` or
    ``https://``, without credentials: those are ``delivery.web_*``)."""

    url: str

    @classmethod
    def parse(cls, text: str) -> WebDestination:
        raw = text.strip().rstrip("/")
        parts = urlsplit(raw)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{text!r} is not an http:// or https:// base URL")
        if parts.username or parts.password:
            raise ValueError(
                "a DICOMweb destination URL must not hold credentials; set delivery.web_user "
                "and web_password_file, or web_token_file"
            )
        if parts.query or parts.fragment:
            raise ValueError(f"{text!r}: a base URL has no query or fragment")
        return cls(raw)

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    def __str__(self) -> str:
        return self.url


def parse_destination(text: str) -> Destination | WebDestination:
    """``AE@host:port[+tls]`` (C-STORE) or an ``http(s)://`` base URL (STOW-RS)."""
    if text.strip().lower().startswith(("http://", "https://")):
        return WebDestination.parse(text)
    return Destination.parse(text)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for DICOM TLS (PS3.15 B.1): CAs to trust, and an optional client identity."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def context(self) -> ssl.SSLContext:
        """A client context that verifies the PACS's certificate and host name."""
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file) if self.ca_file else None
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None:
            context.load_cert_chain(
                str(self.cert_file), str(self.key_file) if self.key_file else None
            )
        return context


@dataclass(frozen=True, slots=True)
class ResultFile:
    """A result object written to the spool, to be sent."""

    kind: ResultKind
    sop_class_uid: str
    sop_instance_uid: str
    path: Path


# An HL7 v2 segment field as configured (``OBR-18``): the configuration checks it, the parser
# reads it.
_FIELD_NAME = re.compile(r"^(?P<segment>[A-Z][A-Z0-9]{2})-(?P<field>[1-9][0-9]{0,2})$")


def field_name(text: str) -> tuple[str, int]:
    """An HL7 v2 field by segment and position: ``"OBR-18"`` -> ``("OBR", 18)``; ValueError
    for anything else."""
    match = _FIELD_NAME.match(text.strip().upper())
    if match is None:
        raise ValueError(f"{text!r} is not a segment field like OBR-18")
    return match["segment"], int(match["field"])


class AssociationEnd(enum.StrEnum):
    """How an association ended."""

    RELEASED = "RELEASED"
    ABORTED = "ABORTED"
    LOST = "LOST"  # the receiver process died; found at the next start


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """The header fields the node keeps for one received instance.

    Patient-identifying fields (accession number) are kept in the database for matching
    reports later, never written to logs.
    """

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str
    body_part: str
    series_description: str
    accession_number: str
    study_date: str

    def __post_init__(self) -> None:
        validate_uid(self.study_uid, "Study Instance UID")
        validate_uid(self.series_uid, "Series Instance UID")
        validate_uid(self.sop_instance_uid, "SOP Instance UID")
        validate_uid(self.sop_class_uid, "SOP Class UID")
        validate_uid(self.transfer_syntax_uid, "Transfer Syntax UID")


@dataclass(frozen=True, slots=True)
class SpooledFile:
    """A dataset durably in the spool: ``relpath`` below the spool root, ``size`` in bytes."""

    relpath: str
    size: int
    replaced: bool  # a file of the same SOP Instance UID was there before


@dataclass(frozen=True, slots=True)
class ImageResult:
    instance_id: int
    sop_instance_uid: str
    probability: float
    peak_row: int
    peak_column: int
    peak_value: float
    peak_area: float
    preprocess_ms: float


@dataclass(frozen=True, slots=True)
class Skip:
    instance_id: int
    sop_instance_uid: str
    reason: str


@dataclass(frozen=True, slots=True)
class StudyAnalysis:
    """Per-image results and the study's score (the maximum over its images)."""

    images: tuple[ImageResult, ...]
    skipped: tuple[Skip, ...]
    model_name: str
    model_version: str
    provider: str
    threshold_high_sensitivity: float
    threshold_high_specificity: float
    inference_ms: float

    @property
    def score(self) -> float | None:
        return max((i.probability for i in self.images), default=None)

    @property
    def outcome(self) -> Outcome:
        if self.score is None:
            return Outcome.SKIPPED
        return (
            Outcome.POSITIVE if self.score >= self.threshold_high_sensitivity else Outcome.NEGATIVE
        )

    @property
    def operating_point(self) -> OperatingPointName | None:
        """The strictest operating point the score reaches."""
        if self.score is None:
            return None
        if self.score >= self.threshold_high_specificity:
            return OperatingPointName.HIGH_SPECIFICITY
        if self.score >= self.threshold_high_sensitivity:
            return OperatingPointName.HIGH_SENSITIVITY
        return None
