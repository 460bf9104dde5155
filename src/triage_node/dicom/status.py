"""DIMSE status values in one place (PS3.7 Annex C; C-STORE PS3.4 Annex B.2.3, C-FIND C.4.1.1.4),
and what a C-STORE answer means for a result object on its way to the PACS."""

from __future__ import annotations

import enum

# C-STORE response statuses the node's Storage SCP answers with (PS3.4 Annex B.2.3).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
STUDY_UID_MISMATCH = 0xA900  # STOW-RS (PS3.18 Table I.2-2): not of the study in the URL
PROCESSING_FAILURE = 0x0110
ERROR_COMMENT_MAX = 64  # (0000,0902) Error Comment is LO


def error_comment(text: str) -> str:
    """*text* as an Error Comment: LO, so at most 64 characters, one value (no backslash) and
    no control characters; ASCII, as every peer can show it."""
    cleaned = "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in text)
    return cleaned[:ERROR_COMMENT_MAX].strip()


# (source, diagnostic) of A-ASSOCIATE-RJ (PS3.8 Table 9-21) as people read them.
REJECT_REASONS: dict[tuple[int | None, int | None], str] = {
    (1, 3): "calling AE title not allowed",
    (1, 7): "called AE title is not this node's",
    (2, 1): "user identity not accepted",
    (3, 2): "too many associations (local limit exceeded)",
}

# Warnings a Storage SCP may answer with; the object was kept (PS3.4 Annex B.2.3).
STORE_WARNINGS = frozenset({0x0001, 0xB000, 0xB006, 0xB007})
# C-FIND: more matches follow (PS3.4 Annex C.4.1.1.4).
FIND_PENDING = frozenset({0xFF00, 0xFF01})


class DeliveryOutcome(enum.StrEnum):
    """What happened to one result object sent by C-STORE."""

    SENT = "sent"  # Success or a Warning: the PACS kept it
    FAILED = "failed"  # a Failure status: kept with the status and its comment, retried later
    UNREACHABLE = "unreachable"  # no association (refused, timed out, no answer)


def classify_store_status(status: int) -> DeliveryOutcome:
    """A C-STORE response status as a delivery outcome."""
    if status == SUCCESS or status in STORE_WARNINGS:
        return DeliveryOutcome.SENT
    return DeliveryOutcome.FAILED
