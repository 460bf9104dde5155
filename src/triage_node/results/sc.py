"""The heatmap Secondary Capture: one per analysed image, in its own series, "NOT FOR
DIAGNOSTIC USE" (PS3.3 A.8)."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from triage_node.domain import MANUFACTURER, ResultKind
from triage_node.results.codes import HEATMAP_DESCRIPTION, SERIES_NUMBERS
from triage_node.results.common import (
    Algorithm,
    AnalysedImage,
    ResultUIDs,
    character_set,
    equipment,
    tolerant_of_source_names,
)


def heatmap_capture(
    image: AnalysedImage, pixels: np.ndarray, algorithm: Algorithm, uids: ResultUIDs, index: int
) -> hd.sc.SCImage:
    """The heatmap picture (RGB uint8) as a Secondary Capture in the source image's study."""
    source = image.source
    orientation = _orientation(source)
    with tolerant_of_source_names():
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=uids.series(ResultKind.SC),
            series_number=SERIES_NUMBERS[ResultKind.SC],
            sop_instance_uid=uids.instance(ResultKind.SC, index),
            instance_number=index + 1,
            manufacturer=MANUFACTURER,
            specific_character_set=character_set(source),
            # highdicom insists on an orientation in the PATIENT system; a source without one
            # gets a placeholder that is emptied below (Patient Orientation is Type 2).
            patient_orientation=orientation or ("A", "F"),
            series_description=HEATMAP_DESCRIPTION,
            contributing_equipment=[equipment(algorithm)],
        )
    if orientation is None:
        del sc.PatientOrientation
        sc.add_new("PatientOrientation", "CS", "")
    # Laterality (Type 2C): the source's, for paired body parts; empty when the source has none.
    laterality = str(source.get("Laterality", "") or source.get("ImageLaterality", ""))
    sc.Laterality = laterality if laterality in ("R", "L") else ""
    sc.BurnedInAnnotation = "YES"  # the legend and the not-for-diagnosis line are in the pixels
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = (
        f"Class-activation map of {algorithm.name} {algorithm.version} over the windowed image; "
        f"probability {image.probability:.3f}. NOT FOR DIAGNOSTIC USE"
    )[:1024]
    sc.ImageComments = "NOT FOR DIAGNOSTIC USE"
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    return sc


def _orientation(source: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation when it is a valid biped one, else none (Type 2, empty)."""
    value = source.get("PatientOrientation")
    if value is None or isinstance(value, str) or len(value) != 2:
        return None
    row, column = str(value[0]), str(value[1])
    if all(text and set(text) <= set("APLRHF") for text in (row, column)):
        return (row, column)
    return None
