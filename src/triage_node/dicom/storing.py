"""Storing one received dataset file: the promise every receiver keeps (C-STORE and STOW-RS).

The file is checked (its header parsed, the caller's own checks), then fsynced, renamed into the
spool and its directory fsynced on a flusher thread while its row is committed here
(``commit_and_record``); only a :class:`Stored` with code SUCCESS may be reported to the sender
as stored. When the row fails the file is removed; when the file fails to reach the spool the
new row is taken back; a failed directory fsync after the rename is reported as out of
resources, and the sender's resend replaces row and file.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.dataset import Dataset

from triage_node.dicom.status import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    SUCCESS,
)
from triage_node.domain import InstanceHeader, SpooledFile
from triage_node.errors import (
    DatabaseUnavailable,
    DatasetError,
    InvalidUID,
    NotPlaced,
    OutOfResources,
)
from triage_node.logs import get_logger, log_event
from triage_node.spool import Spool

if TYPE_CHECKING:  # the aggregate is passed in by the service
    from triage_node.db.intake import Intake, RecordedInstance

LOG = get_logger(__name__)

Check = Callable[[InstanceHeader], "tuple[int, str] | None"]  # a refusal, or None

# An InstanceHeader's fields and the elements they are read from: only these are read from a
# C-STORE's file (the others are skipped over, not decoded: 0.39 instead of 0.64 ms per small
# instance, measured).
HEADER_ELEMENTS = {
    "study_uid": "StudyInstanceUID",
    "series_uid": "SeriesInstanceUID",
    "sop_instance_uid": "SOPInstanceUID",
    "sop_class_uid": "SOPClassUID",
    "modality": "Modality",
    "body_part": "BodyPartExamined",
    "series_description": "SeriesDescription",
    "accession_number": "AccessionNumber",
    "study_date": "StudyDate",
}


def read_header(path: Path, *, whole: bool = False) -> InstanceHeader:
    """Read the header fields the node keeps (:data:`HEADER_ELEMENTS`; pydicom adds Specific
    Character Set), stopping before Pixel Data.

    With *whole*, the whole file is read and checked to be complete (``_check_complete``):
    what an HTTP part needs, where nothing but the dataset itself tells where it ends.
    Raises DatasetError when the dataset cannot be parsed, is truncated (*whole*) or a required
    UID is missing/invalid.
    """
    try:
        if whole:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # "End of file reached before delimiter"
                ds = dcmread(path)
        else:
            ds = dcmread(
                path, stop_before_pixels=True, specific_tags=list(HEADER_ELEMENTS.values())
            )
        transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
    except Exception as exc:  # pydicom raises many types for malformed data
        raise DatasetError(f"cannot parse dataset: {type(exc).__name__}") from exc
    if whole:
        _check_complete(ds)
    try:

        def text(keyword: str) -> str:
            value = ds.get(keyword, "")
            return "" if value is None else str(value).strip()

        fields = {field: text(keyword) for field, keyword in HEADER_ELEMENTS.items()}
        return InstanceHeader(transfer_syntax_uid=transfer_syntax, **fields)
    except InvalidUID as exc:
        raise DatasetError(str(exc)) from None
    except Exception as exc:  # pydicom raises many types for malformed data
        raise DatasetError(f"cannot parse dataset: {type(exc).__name__}") from exc


def _check_complete(ds: Dataset) -> None:
    """Raise DatasetError when the file ended inside a data element (a truncated upload).

    C-STORE's framing tells when a dataset is whole; an HTTP part does not, and pydicom reads a
    truncated value without complaint, so every top-level value's length is compared with what
    was read (an undefined-length value must have reached its delimiter: the warning that it
    did not is an error while reading). A file cut exactly between two elements cannot be told
    from a shorter dataset.
    """
    for tag, element in ds._dict.items():  # raw elements: their declared and read lengths
        length = getattr(element, "length", None)
        value = getattr(element, "value", None)
        if length is None or length == 0xFFFFFFFF or not isinstance(value, bytes | None):
            continue
        if len(value or b"") < length:
            raise DatasetError(f"dataset truncated in element {tag}")


@dataclass(frozen=True)
class Stored:
    code: int
    comment: str
    header: InstanceHeader | None = None


class Storer:
    """Stores dataset files durably for one receiver (thread-safe)."""

    def __init__(
        self, spool: Spool, intake: Intake, min_free_bytes: int, clock: Callable[[], datetime]
    ) -> None:
        self.spool = spool
        self.intake = intake
        self.min_free_bytes = min_free_bytes
        self.clock = clock

    def store(
        self,
        partial: Path,
        association_id: int | None,
        check: Check | None,
        *,
        whole: bool = False,
        header: InstanceHeader | None = None,
    ) -> Stored:
        """Store *partial* (consumed: renamed into the spool, or left for the caller to remove);
        *whole*: check that the file is a complete dataset first (``read_header``); *header*:
        its fields as the receiver already read them (not read again)."""
        try:
            self.spool.ensure_free(self.min_free_bytes)
        except OutOfResources as exc:
            return Stored(OUT_OF_RESOURCES, str(exc))
        self.spool.start_writeback(partial)  # the disk works while the header is read
        if header is None:
            try:
                header = read_header(partial, whole=whole)
            except DatasetError as exc:
                return Stored(CANNOT_UNDERSTAND, str(exc))
        refusal = check(header) if check is not None else None
        if refusal is not None:
            return Stored(*refusal, header=header)

        made: list[tuple[SpooledFile, RecordedInstance | None]] = []

        def record(spooled: SpooledFile) -> RecordedInstance | None:
            try:
                recorded = self.intake.record_instance(
                    header, spooled, association_id, self.clock()
                )
            except DatabaseUnavailable as exc:
                recorded = None
                log_event(
                    LOG,
                    logging.ERROR,
                    "database_write_failed",
                    "could not record an instance",
                    sop_instance_uid=header.sop_instance_uid,
                    error=exc.cause,
                )
            made.append((spooled, recorded))
            return recorded

        try:
            recorded = self.spool.commit_and_record(partial, header, record)
        except NotPlaced as exc:
            self._take_back(made, association_id, header)
            return Stored(OUT_OF_RESOURCES, str(exc), header=header)
        except OutOfResources as exc:
            return Stored(OUT_OF_RESOURCES, str(exc), header=header)
        if recorded is None:
            spooled, _ = made[0]
            if not spooled.replaced:
                self.spool.remove(spooled.relpath)
            return Stored(OUT_OF_RESOURCES, "database unavailable; try again later", header)
        if recorded.reopened:
            log_event(
                LOG,
                logging.INFO,
                "study_reopened",
                "instance arrived for a queued study",
                study_uid=header.study_uid,
                sop_instance_uid=header.sop_instance_uid,
            )
        return Stored(SUCCESS, "", header)

    def _take_back(
        self,
        made: list[tuple[SpooledFile, RecordedInstance | None]],
        association_id: int | None,
        header: InstanceHeader,
    ) -> None:
        """The file did not reach the spool: remove the row recorded for it, unless the
        instance had one before or another resend's file is there now."""
        if not made:
            return  # the spool refused before anything was recorded
        spooled, recorded = made[0]
        if recorded is None or self.spool.path_of(spooled.relpath).exists():
            return
        try:
            self.intake.forget_instance(recorded, association_id)
        except DatabaseUnavailable as exc:  # the worker holds the study back until a resend
            log_event(
                LOG,
                logging.ERROR,
                "database_write_failed",
                "could not take back an instance whose file was not stored",
                sop_instance_uid=header.sop_instance_uid,
                error=exc.cause,
            )


__all__ = ["HEADER_ELEMENTS", "Check", "Stored", "Storer", "read_header"]
