"""Asking a DICOMweb PACS what a study holds: QIDO-RS (PS3.18 10.6) with ``dicomweb-client``.

The same questions as the C-FIND path (``dicom/find_scu``), answered in the same
:class:`~triage_node.dicom.find_scu.StudyContents`, so one set of report rules serves both:
``/studies?StudyInstanceUID=`` (with Modalities in Study), ``/studies/{uid}/series`` (Modality,
Series Description), and ``/studies/{uid}/series/{uid}/instances`` in SR and DOC series (and
those the caller picks) with SOP Class UID, Completion Flag and Verification Flag requested by
``includefield``. A server that does not return an optional attribute leaves it empty, as a
C-FIND SCP does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from triage_node.dicom.find_scu import (
    PacsSeries,
    QueryFailed,
    StudyContents,
    looked_inside,
    modalities_of,
    object_of,
    series_of,
)
from triage_node.dicomweb.stow_client import WebCredentials, web_session
from triage_node.domain import TlsFiles, WebDestination
from triage_node.errors import TriageError


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _datasets(answers: list[dict[str, Any]]) -> list[Dataset]:
    return [Dataset.from_json(answer) for answer in answers]


def study_contents_qido(
    pacs: WebDestination,
    study_uid: str,
    *,
    credentials: WebCredentials,
    timeout: float = 30.0,
    tls: TlsFiles | None = None,
    look_inside: Callable[[PacsSeries], bool] = lambda s: False,
) -> StudyContents:
    """What the PACS holds for *study_uid*; :class:`QueryFailed` when it cannot say."""
    try:
        session = web_session(credentials, tls)
    except (TriageError, OSError) as exc:
        raise QueryFailed(f"DICOMweb set-up failed: {exc}") from None
    try:
        with session:
            client = DICOMwebClient(pacs.url, session=session, timeout=timeout)
            studies = _datasets(
                client.search_for_studies(
                    search_filters={"StudyInstanceUID": study_uid},
                    fields=["ModalitiesInStudy"],
                )
            )
            studies = [s for s in studies if _text(s, "StudyInstanceUID") == study_uid]
            if not studies:
                return StudyContents(False, (), (), ())
            series = tuple(
                series_of(found)
                for found in _datasets(
                    client.search_for_series(
                        study_instance_uid=study_uid, fields=["Modality", "SeriesDescription"]
                    )
                )
            )
            objects = tuple(
                object_of(one, found)
                for one in series
                if looked_inside(one, look_inside)
                for found in _datasets(
                    client.search_for_instances(
                        study_instance_uid=study_uid,
                        series_instance_uid=one.series_uid,
                        fields=["SOPClassUID", "CompletionFlag", "VerificationFlag"],
                    )
                )
            )
            return StudyContents(True, modalities_of(studies[0]), series, objects)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        raise QueryFailed(f"QIDO-RS answered HTTP {status}") from None
    except (requests.RequestException, ValueError) as exc:
        raise QueryFailed(f"QIDO-RS failed: {type(exc).__name__}") from None
