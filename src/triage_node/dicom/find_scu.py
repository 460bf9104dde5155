"""Asking the PACS what a study holds: C-FIND SCU, Study Root model (PS3.4 C.4.1, C.6.2).

One association per study: a STUDY-level query (is the study there, with which modalities),
a SERIES-level query for every series (modality, description), then an IMAGE-level query in
each SR or DOC series (and any other the caller picks) for SOP class, Completion Flag and
Verification Flag (optional keys, PS3.4 C.6.1.1.5; a PACS that does not support them answers
them empty).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from triage_node.dicom.identity import node_ae
from triage_node.dicom.status import FIND_PENDING, SUCCESS
from triage_node.domain import Destination, TlsFiles
from triage_node.errors import TriageError

# Series that may hold a report; their instances are looked at one by one.
REPORT_SERIES_MODALITIES = frozenset({"SR", "DOC"})


class QueryFailed(TriageError):
    """The PACS could not be queried."""


@dataclass(frozen=True, slots=True)
class PacsSeries:
    series_uid: str
    modality: str
    description: str


@dataclass(frozen=True, slots=True)
class PacsObject:
    """An instance in the PACS that might be a report."""

    series: PacsSeries
    sop_instance_uid: str
    sop_class_uid: str
    completion_flag: str  # COMPLETE or PARTIAL for SR; "" when unknown
    verification_flag: str  # VERIFIED or UNVERIFIED for SR; "" when unknown


@dataclass(frozen=True, slots=True)
class StudyContents:
    found: bool  # the PACS knows the study
    modalities: tuple[str, ...]  # Modalities in Study, as the PACS answered it
    series: tuple[PacsSeries, ...]
    objects: tuple[PacsObject, ...]  # the instances of the series looked inside


def _find(assoc: Association, identifier: Dataset) -> list[Dataset]:
    answers = []
    for status, found in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
        code = getattr(status, "Status", None)
        if code is None:
            raise QueryFailed("no C-FIND response (timeout or association aborted)")
        if code in FIND_PENDING and found is not None:
            answers.append(found)
        elif code not in FIND_PENDING and code != SUCCESS:
            comment = str(status.get("ErrorComment", ""))
            raise QueryFailed(f"C-FIND status 0x{code:04X} {comment}".rstrip())
    return answers


def _study_query(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    ds.ModalitiesInStudy = ""
    return ds


def _series_query(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = ""
    ds.Modality = ""
    ds.SeriesDescription = ""
    return ds


def _image_query(study_uid: str, series_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = ""
    ds.SOPClassUID = ""
    ds.CompletionFlag = ""
    ds.VerificationFlag = ""
    return ds


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def modalities_of(study: Dataset) -> tuple[str, ...]:
    """Modalities in Study of a STUDY-level answer (C-FIND or QIDO-RS), upper case."""
    value = study.get("ModalitiesInStudy") or []
    listed = [value] if isinstance(value, str) else list(value)
    return tuple(str(m).upper() for m in listed)


def series_of(found: Dataset) -> PacsSeries:
    """A SERIES-level answer (C-FIND or QIDO-RS)."""
    return PacsSeries(
        _text(found, "SeriesInstanceUID"),
        _text(found, "Modality").upper(),
        _text(found, "SeriesDescription"),
    )


def object_of(series: PacsSeries, found: Dataset) -> PacsObject:
    """An IMAGE-level answer (C-FIND or QIDO-RS) in *series*."""
    return PacsObject(
        series,
        _text(found, "SOPInstanceUID"),
        _text(found, "SOPClassUID"),
        _text(found, "CompletionFlag").upper(),
        _text(found, "VerificationFlag").upper(),
    )


def looked_inside(series: PacsSeries, look_inside: Callable[[PacsSeries], bool]) -> bool:
    """Whether a series' instances are listed: SR and DOC series, and those the caller picks."""
    return bool(series.series_uid) and (
        series.modality in REPORT_SERIES_MODALITIES or look_inside(series)
    )


def study_contents(
    pacs: Destination,
    study_uid: str,
    *,
    calling_ae: str,
    timeout: float = 30.0,
    tls: TlsFiles | None = None,
    look_inside: Callable[[PacsSeries], bool] = lambda s: False,
) -> StudyContents:
    """What the PACS holds for *study_uid*; :class:`QueryFailed` when it cannot say.

    Instances are listed for SR and DOC series and for those *look_inside* picks.
    """
    ae = node_ae(calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    tls_args = None
    if pacs.tls:
        try:
            tls_args = ((tls or TlsFiles()).context(), pacs.host)
        except (OSError, ssl.SSLError) as exc:
            raise QueryFailed(f"TLS set-up failed: {exc}") from None
    assoc = ae.associate(pacs.host, pacs.port, ae_title=pacs.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
        raise QueryFailed(f"association {why}: {pacs}")
    try:
        studies = _find(assoc, _study_query(study_uid))
        if not studies:
            return StudyContents(False, (), (), ())
        modalities = modalities_of(studies[0])
        series = tuple(series_of(found) for found in _find(assoc, _series_query(study_uid)))
        objects = tuple(
            object_of(one, found)
            for one in series
            if looked_inside(one, look_inside)
            for found in _find(assoc, _image_query(study_uid, one.series_uid))
        )
    finally:
        if assoc.is_established:
            assoc.release()
    return StudyContents(True, modalities, series, objects)
