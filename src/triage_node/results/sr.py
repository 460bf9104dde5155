"""The Structured Report: a Comprehensive 3D SR holding a TID 1500 Measurement Report for
every analysed study, negatives included (PS3.16 TID 1500, 1410, 4019), template-exact for
PixelMed's ``DicomSRValidator`` as well as dciodvfy.

- Procedure reported: (363679005, SCT, "Imaging procedure"), from CID 100 as TID 1500 requires.
- Per image a TID 1410 Planar ROI group: Finding "Fracture of bone" (SCT 125605004), the
  algorithm (TID 4019: name, version, parameters; its manufacturer is the device observer's and
  the Contributing Equipment's), the model's hottest region on the source image as the Image
  Region (SCOORD CIRCLE, selected from the image) and, in its TID 1419 measurements, the
  calibrated probability as (111012, DCM, "Certainty of Finding"). Negative images get their
  group too: the region is where the model found the most evidence, the certainty says how
  little. Every group is TID 1410, never a mix with TID 1501, so a reader (or validator) that
  picks one template for the Imaging Measurements container reads every group right.
- The study's finding at the operating point, "Fracture of bone" = Present/Absent, as TID 1500's
  own Qualitative Evaluations (row 12, (C0034375, UMLS, "Qualitative Evaluations")).

UNVERIFIED and PRELIMINARY: a radiologist has not read it. Built with highdicom's templates
and content items, never by hand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from triage_node.domain import MANUFACTURER, ResultKind
from triage_node.results.codes import (
    ABSENT,
    CERTAINTY,
    FRACTURE,
    IMAGING_PROCEDURE,
    PRESENT,
    QUALITATIVE_EVALUATIONS,
    SERIES_NUMBERS,
    UNITLESS,
)
from triage_node.results.common import (
    Algorithm,
    AnalysedImage,
    ResultUIDs,
    algorithm_id,
    character_set,
    device_observer,
    equipment,
    tolerant_of_source_names,
)


def _hot_region(image: AnalysedImage) -> hd.sr.ImageRegion:
    rows, columns = int(image.source.Rows), int(image.source.Columns)
    radius = max(4.0, math.sqrt(max(image.peak_area, 0.0) * rows * columns / math.pi))
    radius = min(radius, max(rows, columns) / 4)
    x, y = float(image.peak_column) + 0.5, float(image.peak_row) + 0.5
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.CIRCLE,
        graphic_data=np.array([[x, y], [min(x + radius, float(columns)), y]]),
        source_image=hd.sr.SourceImageForRegion.from_source_image(image.source),
    )


def _certainty(image: AnalysedImage) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=CERTAINTY, value=round(image.probability, 6), unit=UNITLESS)


def _study_finding(images: Sequence[AnalysedImage]) -> hd.sr.ContainerContentItem:
    """TID 1500 rows 12-13: the study's finding at the operating point."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.CodeContentItem(
                name=FRACTURE,
                value=PRESENT if any(image.positive for image in images) else ABSENT,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        ]
    )
    return container


def structured_report(
    images: Sequence[AnalysedImage],
    algorithm: Algorithm,
    uids: ResultUIDs,
    predecessor: Dataset | None = None,
) -> hd.sr.Comprehensive3DSR:
    """TID 1500 Measurement Report of one analysed study (PS3.16 TID 1500, 1410, 4019)."""
    if not images:
        raise ValueError("a report needs at least one analysed image")
    groups = [
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=uids.uid("region", str(index)),
                identifier=f"image {index + 1}: region of most evidence",
            ),
            referenced_region=_hot_region(image),
            finding_type=FRACTURE,
            algorithm_id=algorithm_id(algorithm),
            measurements=[_certainty(image)],
        )
        for index, image in enumerate(images)
    ]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=device_observer(algorithm)
        ),
        procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=groups,
    )
    content = report[0]
    content.ContentSequence.append(_study_finding(images))
    first = images[0].source
    with tolerant_of_source_names():
        return _comprehensive_sr(images, algorithm, uids, predecessor, content, first)


def _comprehensive_sr(
    images: Sequence[AnalysedImage],
    algorithm: Algorithm,
    uids: ResultUIDs,
    predecessor: Dataset | None,
    content: Dataset,
    first: Dataset,
) -> hd.sr.Comprehensive3DSR:
    return hd.sr.Comprehensive3DSR(
        evidence=[image.source for image in images],
        content=content,
        series_instance_uid=uids.series(ResultKind.SR),
        series_number=SERIES_NUMBERS[ResultKind.SR],
        sop_instance_uid=uids.instance(ResultKind.SR),
        instance_number=1,
        manufacturer=MANUFACTURER,
        specific_character_set=character_set(first),
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=[predecessor] if predecessor is not None else None,
        contributing_equipment=[equipment(algorithm)],
        series_description=f"AI fracture triage report - {algorithm.name} {algorithm.version}",
        institution_name=first.get("InstitutionName") or None,
    )
