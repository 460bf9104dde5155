"""The Key Object Selection "Of Interest" (113000, DCM) referencing a study's positive images
(PS3.3 A.35.4, TID 2010), template-exact for PixelMed's ``DicomSRValidator``: TID 2010's
references (rows 8-10) carry no concept name, where highdicom gives them (121112, DCM,
"Source"), so the document drops it."""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset

from triage_node.domain import MANUFACTURER, ResultKind
from triage_node.results.codes import OF_INTEREST, SERIES_NUMBERS
from triage_node.results.common import (
    Algorithm,
    AnalysedImage,
    ResultUIDs,
    character_set,
    device_observer,
    equipment,
    tolerant_of_source_names,
)


def key_objects(
    images: Sequence[AnalysedImage], algorithm: Algorithm, uids: ResultUIDs
) -> hd.ko.KeyObjectSelectionDocument:
    """Key Object Selection "Of Interest" referencing the positive images (PS3.3 A.35.4)."""
    positives = [image.source for image in images if image.positive]
    if not positives:
        raise ValueError("a key object selection needs at least one positive image")
    content = hd.ko.KeyObjectSelection(
        document_title=OF_INTEREST,
        referenced_objects=positives,
        observer_device_context=device_observer(algorithm),
        description=f"Possible fracture ({algorithm.name} {algorithm.version}, "
        f"{algorithm.operating_point}); not verified by a radiologist",
    )
    with tolerant_of_source_names():
        document = _key_object_document(positives, content, algorithm, uids)
    for item in document.ContentSequence:
        if (
            item.ValueType in ("IMAGE", "COMPOSITE", "WAVEFORM")
            and "ConceptNameCodeSequence" in item
        ):
            del item.ConceptNameCodeSequence  # TID 2010: a reference has no concept name
    return document


def _key_object_document(
    positives: list[Dataset],
    content: hd.ko.KeyObjectSelection,
    algorithm: Algorithm,
    uids: ResultUIDs,
) -> hd.ko.KeyObjectSelectionDocument:
    return hd.ko.KeyObjectSelectionDocument(
        evidence=positives,
        content=content,
        series_instance_uid=uids.series(ResultKind.KO),
        series_number=SERIES_NUMBERS[ResultKind.KO],
        sop_instance_uid=uids.instance(ResultKind.KO),
        instance_number=1,
        manufacturer=MANUFACTURER,
        specific_character_set=character_set(positives[0]),
        contributing_equipment=[equipment(algorithm)],
        series_description="AI fracture flag",
    )
