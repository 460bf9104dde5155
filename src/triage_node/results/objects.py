"""The result objects written back into the study (architecture.md, "result contract").

Built with highdicom, never by hand (style.md, habit 5):

- a Comprehensive 3D SR holding a TID 1500 Measurement Report, for every analysed study,
  negatives included: per image a TID 1501 group with the finding "Fracture of bone"
  (SCT 125605004), Present/Absent, the probability as (111012, DCM, "Certainty of Finding"),
  and the algorithm (TID 4019); for positive images a TID 1410 group with the CAM's hot region
  on the source image. UNVERIFIED and PRELIMINARY: a radiologist has not read it.
- a Secondary Capture heatmap per analysed image, in its own series, "NOT FOR DIAGNOSTIC USE";
- a Key Object Selection "Of Interest" (113000, DCM) referencing the positive images.

Every UID is derived from the study, the model version and the result version, so sending the
same result again replaces it in the PACS instead of duplicating it (PS3.5 B.2: "2.25." UUID form).
"""

from __future__ import annotations

import math
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from triage_node import __version__
from triage_node.domain import MANUFACTURER, ResultKind

FRACTURE = CodedConcept("125605004", "SCT", "Fracture of bone")
PRESENT = CodedConcept("52101004", "SCT", "Present")
ABSENT = CodedConcept("272519000", "SCT", "Absent")
CERTAINTY = CodedConcept("111012", "DCM", "Certainty of Finding")
UNITLESS = CodedConcept("1", "UCUM", "no units")
OF_INTEREST = CodedConcept("113000", "DCM", "Of Interest")
RADIOGRAPHY = CodedConcept("363680008", "SCT", "Radiographic imaging procedure")
HOT_REGION = CodedConcept("128773", "DCM", "Reference Geometry")
SERIES_NUMBERS = {ResultKind.SR: 9901, ResultKind.SC: 9902, ResultKind.KO: 9903}
HEATMAP_DESCRIPTION = "AI FRACTURE HEATMAP - NOT FOR DIAGNOSTIC USE"
_UID_NAMESPACE = uuid.UUID("5b1f3a4e-2c53-4c1e-9d0e-7a7c1e2f9b10")  # triage-node's own


def derived_uid(*parts: str) -> str:
    """A UID named by *parts*: "2.25." and a name-based (SHA-1) UUID (PS3.5 B.2)."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(0).join(parts)).int}"


@dataclass(frozen=True, slots=True)
class Algorithm:
    name: str
    version: str
    operating_point: str
    threshold: float

    @property
    def device_uid(self) -> str:
        return derived_uid("device", self.name)


@dataclass(frozen=True, slots=True)
class AnalysedImage:
    source: Dataset  # the source instance's header (pixel data not needed)
    probability: float
    positive: bool
    peak_row: int
    peak_column: int
    peak_area: float  # share of the image at least half as hot as the peak


@dataclass(frozen=True, slots=True)
class ResultUIDs:
    """Deterministic UIDs of one result set: same study, model and result version, same UIDs."""

    study_uid: str
    model_version: str
    result_version: str | int  # changes exactly when the analysed content changes

    def uid(self, *parts: str) -> str:
        return derived_uid(
            "result", self.study_uid, self.model_version, str(self.result_version), *parts
        )

    def series(self, kind: ResultKind) -> str:
        return self.uid(kind, "series")

    def instance(self, kind: ResultKind, index: int = 0) -> str:
        return self.uid(kind, "instance", str(index))


@contextmanager
def _tolerant_of_source_names() -> Iterator[None]:
    """Source headers carry what modalities wrote: highdicom warns about person names such as a
    single-component Referring Physician's Name, copied unchanged from the source. Not our error."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The string .* person name", category=UserWarning)
        yield


# Type 2 attributes of the Patient and General Study modules that the result objects copy from
# their source (PS3.3 C.7.1.1, C.7.2.1). A source that lacks one gets it empty, as Type 2 allows.
_COPIED_TYPE_2 = (
    ("PatientName", "PN"),
    ("PatientID", "LO"),
    ("PatientBirthDate", "DA"),
    ("PatientSex", "CS"),
    ("StudyDate", "DA"),
    ("StudyTime", "TM"),
    ("ReferringPhysicianName", "PN"),
    ("StudyID", "SH"),
    ("AccessionNumber", "SH"),
)


def evidence_header(source: Dataset) -> Dataset:
    """A copy of a source header with the Type 2 attributes the result objects copy present."""
    header = Dataset()
    header.update(source)
    if hasattr(source, "file_meta"):
        header.file_meta = source.file_meta
    for keyword, vr in _COPIED_TYPE_2:
        if keyword not in header:
            header.add_new(keyword, vr, "")
    return header


def _device_observer(algorithm: Algorithm) -> hd.sr.ObserverContext:
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=algorithm.device_uid,
            name=algorithm.name,
            manufacturer_name=MANUFACTURER,
            model_name=algorithm.name,
        ),
    )


def _equipment(algorithm: Algorithm) -> hd.ContributingEquipment:
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=algorithm.name,
        software_versions=f"{__version__} model {algorithm.version}",
        device_serial_number=algorithm.device_uid[-16:],
    )


def _algorithm_id(algorithm: Algorithm) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[
            f"operating point {algorithm.operating_point}",
            f"threshold {algorithm.threshold:.6g}",
        ],
        manufacturer=MANUFACTURER,
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
                algorithm_id=_algorithm_id(algorithm),
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
                    algorithm_id=_algorithm_id(algorithm),
                    qualitative_evaluations=[hd.sr.QualitativeEvaluation(FRACTURE, PRESENT)],
                    measurements=[_certainty(image)],
                )
            )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=_device_observer(algorithm)
        ),
        procedure_reported=RADIOGRAPHY,
        imaging_measurements=groups,
    )
    first = images[0].source
    with _tolerant_of_source_names():
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
        contributing_equipment=[_equipment(algorithm)],
        series_description=f"AI fracture triage report - {algorithm.name} {algorithm.version}",
        institution_name=first.get("InstitutionName") or None,
    )


def heatmap_capture(
    image: AnalysedImage, pixels: np.ndarray, algorithm: Algorithm, uids: ResultUIDs, index: int
) -> hd.sc.SCImage:
    """The heatmap picture (RGB uint8) as a Secondary Capture in the source image's study."""
    source = image.source
    orientation = _orientation(source)
    with _tolerant_of_source_names():
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
            # highdicom insists on an orientation in the PATIENT system; a source without one
            # gets a placeholder that is emptied below (Patient Orientation is Type 2).
            patient_orientation=orientation or ("A", "F"),
            series_description=HEATMAP_DESCRIPTION,
            contributing_equipment=[_equipment(algorithm)],
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
        observer_device_context=_device_observer(algorithm),
        description=f"Possible fracture ({algorithm.name} {algorithm.version}, "
        f"{algorithm.operating_point}); not verified by a radiologist",
    )
    with _tolerant_of_source_names():
        return _key_object_document(positives, content, algorithm, uids)


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
        contributing_equipment=[_equipment(algorithm)],
        series_description="AI fracture flag",
    )
