"""From an analysed study to its result objects, durable in the spool (architecture.md, "Tell").

For every study with at least one analysed image: the SR (negatives included), one heatmap SC per
analysed image, and a KOS when an image reaches the high-sensitivity threshold (the triage flag).
A study that was not analysed (every image skipped, or the analysis failed) gets nothing. The
result version is a digest of the analysed instances (:func:`content_key`): a study re-opened by
late instances gets new objects, and its new SR names the earlier one in Predecessor Documents
Sequence; the same study sent again gets the same objects.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from triage_node.domain import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    OperatingPointName,
    ResultFile,
    ResultKind,
    StudyAnalysis,
)
from triage_node.results.common import Algorithm, AnalysedImage, ResultUIDs, evidence_header
from triage_node.results.kos import key_objects
from triage_node.results.sc import heatmap_capture
from triage_node.results.sr import structured_report
from triage_node.spool import Spool


def algorithm_of(analysis: StudyAnalysis) -> Algorithm:
    """The algorithm as the SR names it: the operating point the study reached (or the
    high-sensitivity one, whose threshold decides the flag)."""
    if analysis.operating_point == OperatingPointName.HIGH_SPECIFICITY:
        return Algorithm(
            analysis.model_name,
            analysis.model_version,
            OperatingPointName.HIGH_SPECIFICITY,
            analysis.threshold_high_specificity,
        )
    return Algorithm(
        analysis.model_name,
        analysis.model_version,
        OperatingPointName.HIGH_SENSITIVITY,
        analysis.threshold_high_sensitivity,
    )


def content_key(sop_instance_uids: Iterable[str]) -> str:
    """The result version: a digest of the analysed instances. Sending the same study again
    gives the same key, so the same UIDs (the PACS replaces, nothing doubles); a study with
    new instances gets a new key, new objects, and an SR naming its predecessor."""
    digest = hashlib.sha256("\n".join(sorted(set(sop_instance_uids))).encode())
    return digest.hexdigest()[:32]


def result_objects(
    study_uid: str,
    result_version: str,
    analysis: StudyAnalysis,
    headers: Mapping[str, Dataset],
    pictures: Mapping[str, np.ndarray],
    predecessor: Dataset | None = None,
) -> list[tuple[ResultKind, Dataset]]:
    """(kind, dataset) for each result object of the study; empty when nothing was analysed."""
    if not analysis.images:
        return []
    algorithm = algorithm_of(analysis)
    uids = ResultUIDs(study_uid, analysis.model_version, result_version)
    images = [
        AnalysedImage(
            source=evidence_header(headers[i.sop_instance_uid]),
            probability=i.probability,
            positive=i.probability >= analysis.threshold_high_sensitivity,
            peak_row=i.peak_row,
            peak_column=i.peak_column,
            peak_area=i.peak_area,
        )
        for i in analysis.images
    ]
    if predecessor is not None and predecessor.SOPInstanceUID == uids.instance(ResultKind.SR):
        predecessor = None  # the same content sent again: this *is* that report
    objects: list[tuple[ResultKind, Dataset]] = [
        (ResultKind.SR, structured_report(images, algorithm, uids, predecessor))
    ]
    for index, image in enumerate(images):
        picture = pictures.get(str(image.source.SOPInstanceUID))
        if picture is not None:
            objects.append((ResultKind.SC, heatmap_capture(image, picture, algorithm, uids, index)))
    if any(image.positive for image in images):
        objects.append((ResultKind.KO, key_objects(images, algorithm, uids)))
    return objects


def encode(dataset: Dataset) -> bytes:
    """The Part 10 file of a result object; its File Meta names the node as its writer."""
    if not hasattr(dataset, "file_meta"):
        dataset.file_meta = FileMetaDataset()
    dataset.file_meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    dataset.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_results(
    spool: Spool, study_uid: str, objects: list[tuple[ResultKind, Dataset]]
) -> list[ResultFile]:
    """Each object durably into the spool; the files to deliver."""
    files = []
    for kind, dataset in objects:
        sop_uid = str(dataset.SOPInstanceUID)
        path = spool.write_result(study_uid, sop_uid, encode(dataset))
        files.append(ResultFile(kind, str(dataset.SOPClassUID), sop_uid, path))
    return files


def read_predecessor(path: Path | None) -> Dataset | None:
    """The earlier SR of a re-analysed study, when its file is still in the spool."""
    if path is None:
        return None
    try:
        return dcmread(path)
    except (OSError, InvalidDicomError):
        return None
