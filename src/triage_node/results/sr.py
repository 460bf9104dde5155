"""The Structured Report: a Comprehensive 3D SR holding a TID 1500 Measurement Report for
every analysed study, negatives included (PS3.16 TID 1500, 1501, 1410).

Per image a TID 1501 group with the finding "Fracture of bone" (SCT 125605004), Present/Absent,
the probability as (111012, DCM, "Certainty of Finding"), and the algorithm (TID 4019); for
positive images a TID 1410 group with the CAM's hot region on the source image. UNVERIFIED and
PRELIMINARY: a radiologist has not read it. Built with highdicom, never by hand.
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
    PRESENT,
    RADIOGRAPHY,
    SERIES_NUMBERS,
    UNITLESS,
)
from triage_node.results.common import (
    Algorithm,
    AnalysedImage,
    ResultUIDs,
    algorithm_id,
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


def structured_report(
    images: Sequence[AnalysedImage],
    algorithm: Algorithm,
    uids: ResultUIDs,
    predecessor: Dataset | None = None,
) -> hd.sr.Comprehensive3DSR:
    """TID 1500 Measurement Report of one analysed study (PS3.16 TID 1500, 1501, 1410, 4019)."""
    if not images:
        raise ValueError("a report needs at least one analysed image")
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    ] = []
    for index, image in enumerate(images):
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=uids.uid("image", str(index)), identifier=f"image {index + 1}"
                ),
                finding_type=FRACTURE,
                algorithm_id=algorithm_id(algorithm),
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(FRACTURE, PRESENT if image.positive else ABSENT)
                ],
                measurements=[_certainty(image)],
                source_images=[
                    hd.sr.SourceImageForMeasurementGroup.from_source_image(image.source)
                ],
            )
        )
        if image.positive:
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=uids.uid("region", str(index)),
                        identifier=f"hottest region, image {index + 1}",
                    ),
                    referenced_region=_hot_region(image),
                    finding_type=FRACTURE,
                    algorithm_id=algorithm_id(algorithm),
                    qualitative_evaluations=[hd.sr.QualitativeEvaluation(FRACTURE, PRESENT)],
                    measurements=[_certainty(image)],
                )
            )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=device_observer(algorithm)
        ),
        procedure_reported=RADIOGRAPHY,
        imaging_measurements=groups,
    )
    first = images[0].source
    with tolerant_of_source_names():
        return _comprehensive_sr(images, algorithm, uids, predecessor, report, first)


def _comprehensive_sr(
    images: Sequence[AnalysedImage],
    algorithm: Algorithm,
    uids: ResultUIDs,
    predecessor: Dataset | None,
    report: hd.sr.MeasurementReport,
    first: Dataset,
) -> hd.sr.Comprehensive3DSR:
    return hd.sr.Comprehensive3DSR(
        evidence=[image.source for image in images],
        content=report[0],
        series_instance_uid=uids.series(ResultKind.SR),
        series_number=SERIES_NUMBERS[ResultKind.SR],
        sop_instance_uid=uids.instance(ResultKind.SR),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=[predecessor] if predecessor is not None else None,
        contributing_equipment=[equipment(algorithm)],
        series_description=f"AI fracture triage report - {algorithm.name} {algorithm.version}",
        institution_name=first.get("InstitutionName") or None,
    )
