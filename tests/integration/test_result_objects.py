"""SR, heatmap SC and KOS built from the shared radiographs: dciodvfy-clean, template-exact,
readable, stable UIDs.

Real peers: dicom3tools ``dciodvfy`` validates every object, PixelMed's ``DicomSRValidator``
checks the SR and the KOS against their templates (TID 1500/1410/4019, TID 2010), DCMTK
``dsrdump`` prints the SR tree, and highdicom reads the SR back.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from tests.support.peers import (
    dciodvfy_errors,
    require_shared_dicom,
    require_tool,
    sr_validator_findings,
    sr_validator_findings_each,
)
from triage_node.analysis.preprocess import InputSpec, preprocess
from triage_node.analysis.render import LEGEND_TEXT, heatmap
from triage_node.domain import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    MANUFACTURER,
    is_valid_uid,
)
from triage_node.results.codes import ABSENT, CERTAINTY, FRACTURE, PRESENT
from triage_node.results.common import (
    Algorithm,
    AnalysedImage,
    ResultUIDs,
    character_set,
    evidence_header,
)
from triage_node.results.kos import key_objects
from triage_node.results.sc import heatmap_capture
from triage_node.results.spooled import encode
from triage_node.results.sr import structured_report

SOURCES = (
    "CR_RG3_extremityAP_mono1_10bit_JPEG-lossless.dcm",
    "CR_RG2_hip_mono2_10bit_uncompressed.dcm",
    "DX_mono1_8bit_small_highdicom.dcm",
    "CR_RG1_chestPA_mono1_15bit_J2K-lossy.dcm",
)
ALGORITHM = Algorithm("fracture-v1", "1.0.0", "high_sensitivity", 0.31)


def analysed(path: Path, probability: float, positive: bool) -> tuple[AnalysedImage, np.ndarray]:
    ds = pydicom.dcmread(path)
    ready = preprocess(ds, InputSpec(size=64))
    cam = np.zeros((8, 8), np.float32)
    cam[3, 5] = 2.0
    pixels = heatmap(ready.display, cam, ready.geometry, 64)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    rows, columns = int(header.Rows), int(header.Columns)
    image = AnalysedImage(header, probability, positive, rows // 3, columns // 2, 0.05)
    return image, pixels


@pytest.mark.parametrize("name", SOURCES)
def test_every_object_passes_dciodvfy_and_reads_back(name: str, tmp_path: Path) -> None:
    source = require_shared_dicom() / name
    image, pixels = analysed(source, 0.83, True)
    uids = ResultUIDs(str(image.source.StudyInstanceUID), ALGORITHM.version, 1)

    objects: dict[str, Dataset] = {
        "sr": structured_report([image], ALGORITHM, uids),
        "sc": heatmap_capture(image, pixels, ALGORITHM, uids, 0),
        "ko": key_objects([image], ALGORITHM, uids),
    }
    for kind, dataset in objects.items():
        path = tmp_path / f"{kind}.dcm"
        path.write_bytes(encode(dataset))  # as the worker writes them into the spool
        assert dciodvfy_errors(path) == [], kind
        written = pydicom.dcmread(path)
        assert written.StudyInstanceUID == image.source.StudyInstanceUID
        assert written.PatientID == image.source.get("PatientID", "")
        assert written.Manufacturer == MANUFACTURER
        assert written.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
        assert written.file_meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    reports = [tmp_path / "sr.dcm", tmp_path / "ko.dcm"]
    assert sr_validator_findings_each(reports) == {path: [] for path in reports}

    sc = pydicom.dcmread(tmp_path / "sc.dcm")
    assert sc.BurnedInAnnotation == "YES" and "NOT FOR DIAGNOSTIC USE" in sc.SeriesDescription
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == image.source.SOPInstanceUID
    assert "Class-activation map" in sc.DerivationDescription

    ko = pydicom.dcmread(tmp_path / "ko.dcm")
    assert ko.ConceptNameCodeSequence[0].CodeValue == "113000"

    report = hd.sr.srread(tmp_path / "sr.dcm")
    assert report.VerificationFlag == "UNVERIFIED" and report.PreliminaryFlag == "PRELIMINARY"
    assert report.content.get_image_measurement_groups() == []  # every group is TID 1410
    [group] = report.content.get_planar_roi_measurement_groups()
    assert group.finding_type == FRACTURE
    [certainty] = group.get_measurements(name=CERTAINTY)
    assert certainty.value == pytest.approx(0.83)
    assert group.reference_type == hd.sr.CodedConcept("111030", "DCM", "Image Region")
    assert group.roi.GraphicType == "CIRCLE"
    [selected_from] = group.roi.ContentSequence  # the SCOORD's source image
    assert selected_from.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        image.source.SOPInstanceUID
    )
    assert study_finding(report) == PRESENT


def study_finding(report: Dataset) -> hd.sr.CodedConcept:
    """The value of TID 1500's Qualitative Evaluations row for "Fracture of bone"."""
    [container] = [
        item
        for item in report.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"
    ]
    [finding] = container.ContentSequence
    assert hd.sr.CodedConcept.from_dataset(finding.ConceptNameCodeSequence[0]) == FRACTURE
    return hd.sr.CodedConcept.from_dataset(finding.ConceptCodeSequence[0])


def test_a_study_with_a_negative_image_reports_every_image(tmp_path: Path) -> None:
    """Each image gets its TID 1410 group, negatives included; the study's finding is Present
    when one image is positive, and the report is template-exact either way."""
    positive, _ = analysed(require_shared_dicom() / SOURCES[0], 0.7, True)
    negative, _ = analysed(require_shared_dicom() / SOURCES[1], 0.03, False)
    uids = ResultUIDs(str(positive.source.StudyInstanceUID), ALGORITHM.version, 1)
    for images, expected in (([positive, negative], PRESENT), ([negative], ABSENT)):
        report = structured_report(images, ALGORITHM, uids)
        report.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
        assert sr_validator_findings(tmp_path / "sr.dcm") == []
        assert dciodvfy_errors(tmp_path / "sr.dcm") == []
        groups = hd.sr.srread(tmp_path / "sr.dcm").content.get_planar_roi_measurement_groups()
        certainties = [g.get_measurements(name=CERTAINTY)[0].value for g in groups]
        assert certainties == pytest.approx([i.probability for i in images])
        assert study_finding(report) == expected


def test_a_date_or_time_no_reader_could_use_is_copied_empty(tmp_path: Path) -> None:
    """A source whose Study Time or Patient's Birth Date is not a DICOM TM/DA (hostile bytes, an
    ACR-NEMA '12:00') still gets its SR, heatmap and key objects, valid, with those values empty
    (Type 2); valid ones are copied unchanged."""
    path = require_shared_dicom() / SOURCES[0]
    image, pixels = analysed(path, 0.83, True)
    for keyword, bad in (
        ("StudyTime", "\xb820000"),
        ("StudyTime", "12:00"),
        ("PatientBirthDate", "19x01231"),
    ):
        source = pydicom.dcmread(path, stop_before_pixels=True)
        source[keyword].value = bad
        header = evidence_header(source)
        assert header[keyword].value in ("", None)
        hostile = AnalysedImage(
            header, image.probability, True, image.peak_row, image.peak_column, 0.05
        )
        uids = ResultUIDs(str(header.StudyInstanceUID), ALGORITHM.version, 1)
        for kind, dataset in (
            ("sr", structured_report([hostile], ALGORITHM, uids)),
            ("sc", heatmap_capture(hostile, pixels, ALGORITHM, uids, 0)),
            ("ko", key_objects([hostile], ALGORITHM, uids)),
        ):
            dataset.save_as(tmp_path / f"{kind}.dcm", enforce_file_format=True)
            assert dciodvfy_errors(tmp_path / f"{kind}.dcm") == [], (keyword, kind)
    kept = evidence_header(pydicom.dcmread(path, stop_before_pixels=True))
    assert kept.StudyDate == pydicom.dcmread(path, stop_before_pixels=True).StudyDate


def shared_radiographs() -> list[Path]:
    """Every shared CR/DX file whose header has the UIDs a report needs."""
    found = []
    for path in sorted(require_shared_dicom().glob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        uids = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
        if ds.get("Modality") in ("CR", "DX") and all(is_valid_uid(str(ds.get(k))) for k in uids):
            found.append(path)
    return found


def test_the_report_of_every_shared_radiograph_is_template_exact(tmp_path: Path) -> None:
    """The SR and KOS of each shared CR/DX header, positive: 0 errors and 0 warnings from
    DicomSRValidator, 0 errors from dciodvfy (their headers differ in what they carry)."""
    sources = shared_radiographs()
    assert len(sources) >= 10
    written: dict[Path, tuple[str, str]] = {}
    for source in sources:
        header = evidence_header(pydicom.dcmread(source, stop_before_pixels=True))  # as the worker
        rows, columns = int(header.get("Rows", 64)), int(header.get("Columns", 64))
        image = AnalysedImage(header, 0.61, True, rows // 2, columns // 2, 0.02)
        uids = ResultUIDs(str(header.StudyInstanceUID), ALGORITHM.version, 1)
        for kind, dataset in (
            ("sr", structured_report([image], ALGORITHM, uids)),
            ("ko", key_objects([image], ALGORITHM, uids)),
        ):
            path = tmp_path / f"{source.stem}-{kind}.dcm"
            path.write_bytes(encode(dataset))
            assert dciodvfy_errors(path) == [], (source.name, kind)
            written[path] = (source.name, kind)
    for path, findings in sr_validator_findings_each(list(written)).items():
        assert findings == [], written[path]


def test_dsrdump_prints_the_tree(tmp_path: Path) -> None:
    image, _ = analysed(require_shared_dicom() / SOURCES[1], 0.12, False)
    uids = ResultUIDs(str(image.source.StudyInstanceUID), "1.0.0", 1)
    structured_report([image], ALGORITHM, uids).save_as(tmp_path / "sr.dcm")
    result = subprocess.run(
        [require_tool("dsrdump", "dcmtk"), str(tmp_path / "sr.dcm")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "Imaging Measurement Report" in result.stdout
    assert '(125605004,SCT,"Fracture of bone")' in result.stdout
    assert '(272519000,SCT,"Absent")' in result.stdout
    assert "Verification Flag   : UNVERIFIED" in result.stdout


def test_uids_are_deterministic_and_a_new_result_version_supersedes() -> None:
    image, _ = analysed(require_shared_dicom() / SOURCES[1], 0.6, True)
    study = str(image.source.StudyInstanceUID)
    first = structured_report([image], ALGORITHM, ResultUIDs(study, "1.0.0", 1))
    again = structured_report([image], ALGORITHM, ResultUIDs(study, "1.0.0", 1))
    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert first.SeriesInstanceUID == again.SeriesInstanceUID
    other_model = ResultUIDs(study, "1.1.0", 1)
    assert other_model.instance("sr") != first.SOPInstanceUID
    second = structured_report([image], ALGORITHM, ResultUIDs(study, "1.0.0", 2), predecessor=first)
    assert second.SOPInstanceUID != first.SOPInstanceUID
    [predecessor] = second.PredecessorDocumentsSequence
    referenced = predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == first.SOPInstanceUID


def test_negative_studies_get_a_report_but_no_key_objects() -> None:
    image, _ = analysed(require_shared_dicom() / SOURCES[1], 0.05, False)
    uids = ResultUIDs(str(image.source.StudyInstanceUID), "1.0.0", 1)
    report = structured_report([image], ALGORITHM, uids)
    assert len(report.ContentSequence) > 0
    with pytest.raises(ValueError, match="positive"):
        key_objects([image], ALGORITHM, uids)


def test_heatmap_pixels_hold_no_patient_data_and_show_a_legend() -> None:
    """render.heatmap sees only pixels and the CAM, never the dataset: no patient text can get
    into the picture. The legend (colour bar on a dark box) sits bottom left."""
    display = np.full((600, 400), 0.9, np.float32)
    cam = np.zeros((4, 4), np.float32)
    cam[1, 2] = 1
    from triage_node.analysis.preprocess import Geometry

    pixels = heatmap(display, cam, Geometry(600, 400, 64 / 600, 64 / 600, 0, 10), 64)
    assert pixels.shape == (600, 400, 3) and pixels.dtype == np.uint8
    legend_row = pixels[600 - 24 - 7]
    assert legend_row[8, 2] > 100 and legend_row[8 + 90, 0] > 100  # blue end, then red end
    assert "NOT FOR DIAGNOSTIC USE" in LEGEND_TEXT


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("ISO_IR 100", "ISO_IR 100"),
        ("ISO 2022 IR 100", "ISO_IR 100"),  # one value with code extensions, as modalities write
        ("ISO 2022 IR 6", None),
        (["ISO 2022 IR 6", "ISO 2022 IR 87"], ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
        ("ISO 2022 IR 87", "ISO_IR 192"),  # not valid alone, and no single-byte equivalent
        ("NOT A CHARSET", "ISO_IR 192"),
    ],
)
def test_the_character_set_of_a_result_is_the_source_s_made_valid(
    value: object, expected: object
) -> None:
    source = Dataset()
    if value is not None:
        source.SpecificCharacterSet = value
    assert character_set(source) == expected
