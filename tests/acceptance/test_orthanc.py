"""End to end with a real PACS: Orthanc sends studies to the node, the node (bundled model) sends
SR, heatmap SCs and, for positives, a KOS back into the same study; a resend changes nothing."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, text

from tests.support.node import Node
from tests.support.orthanc import Orthanc, node_and_orthanc
from tests.support.peers import SHARED, require_shared_dicom, wait_for
from tests.support.synth import dx_from_picture
from triage_node.results.codes import CERTAINTY

BUNDLED = Path(__file__).resolve().parents[2] / "models" / "fracture-v1"
FRACATLAS = SHARED / "data" / "fracatlas"


def rows(url: str, sql: str, **params: str) -> list[tuple]:  # type: ignore[type-arg]
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params)]
    finally:
        engine.dispose()


def fracatlas_study(directory: Path) -> list[Path]:
    """Two fractured and two normal FracAtlas images wrapped as DX instances of one study."""
    with open(FRACATLAS / "labels.csv", newline="") as handle:
        labels = list(csv.DictReader(handle))
    chosen = [r for r in labels if r["fractured"] == "1"][:2]
    chosen += [r for r in labels if r["fractured"] == "0"][:2]
    study_uid, series_uid = generate_uid(), generate_uid()
    directory.mkdir(parents=True)
    paths = []
    for number, row in enumerate(chosen, 1):
        ds = dx_from_picture(FRACATLAS / "images" / row["image_id"], study_uid, series_uid, number)
        path = directory / f"{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def modality_counts(orthanc: Orthanc, study_id: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for series in orthanc.series_of(study_id):
        modality = series["MainDicomTags"].get("Modality", "")
        counts[modality] = counts.get(modality, 0) + len(series["Instances"])
    return counts


@pytest.mark.skipif(not FRACATLAS.is_dir(), reason=f"{FRACATLAS} not found")
def test_orthanc_round_trip_and_resend(tmp_path: Path) -> None:
    shared = require_shared_dicom()
    node, orthanc = node_and_orthanc(tmp_path, BUNDLED)
    try:
        study_a = orthanc.upload(shared / "CR_RG3_extremityAP_mono1_10bit_JPEG-lossless.dcm")
        study_b = None
        for path in fracatlas_study(tmp_path / "fracatlas"):
            study_b = orthanc.upload(path)
        assert study_b is not None
        originals = {study_a: 1, study_b: 4}
        for study in originals:
            orthanc.send_study("node", study)

        def results_arrived() -> bool:
            inferred = rows(node.database_url, "select count(*) from study_results")[0][0] == 2
            pending = rows(node.database_url, "select count(*) from outbox where state != 'SENT'")
            return inferred and pending[0][0] == 0

        wait_for(results_arrived, 120, what="both studies analysed and their results sent")
        outcomes = dict(
            rows(
                node.database_url,
                "select s.study_uid, r.outcome from study_results r join studies s "
                "on s.id = r.study_id",
            )
        )
        for study, images in originals.items():
            uid = orthanc.get(f"/studies/{study}")["MainDicomTags"]["StudyInstanceUID"]
            positive = outcomes[uid] == "positive"
            expected = {"SR": 1, "OT": images, **({"KO": 1} if positive else {})}
            counts = modality_counts(orthanc, study)
            assert {k: v for k, v in counts.items() if k in ("SR", "OT", "KO")} == expected, uid
            check_report(orthanc, study, node, uid)

        before = {study: modality_counts(orthanc, study) for study in originals}
        outbox_rows = rows(node.database_url, "select count(*) from outbox")[0][0]
        orthanc.send_study("node", study_b)  # the same study again
        wait_for(
            lambda: (
                rows(node.database_url, "select count(*) from jobs where state = 'DONE'")[0][0] == 3
            ),
            120,
            what="the resent study to be analysed again",
        )
        time.sleep(1.0)  # a delivery round or more
        assert {study: modality_counts(orthanc, study) for study in originals} == before
        assert rows(node.database_url, "select count(*) from outbox")[0][0] == outbox_rows
    finally:
        assert node.stop() == 0
        orthanc.stop()


def check_report(orthanc: Orthanc, study: str, node: Node, study_uid: str) -> None:
    """The SR in Orthanc holds the probabilities the node recorded, for the right images."""
    [sr_series] = [
        s for s in orthanc.series_of(study) if s["MainDicomTags"].get("Modality") == "SR"
    ]
    data = orthanc.instance_file(sr_series["Instances"][0])
    report = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(data)))
    assert report.Manufacturer == "triage-node" and report.VerificationFlag == "UNVERIFIED"
    recorded = dict(
        rows(
            node.database_url,
            "select i.sop_instance_uid, ir.probability from image_results ir "
            "join instances i on i.id = ir.instance_id join study_results r "
            "on r.id = ir.study_result_id join studies s on s.id = r.study_id "
            "where s.study_uid = :uid and ir.probability is not null",
            uid=study_uid,
        )
    )
    groups = report.content.get_planar_roi_measurement_groups()  # one per image (TID 1410)
    found = {}
    for group in groups:
        [certainty] = group.get_measurements(name=CERTAINTY)
        [source] = group.roi.ContentSequence  # the image the region was selected from
        found[source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID] = certainty.value
    assert set(found) == set(recorded)
    for uid, probability in recorded.items():
        assert found[uid] == pytest.approx(probability, abs=1e-5)


@pytest.mark.skipif(not FRACATLAS.is_dir(), reason=f"{FRACATLAS} not found")
def test_results_wait_for_orthanc_and_arrive_once(tmp_path: Path) -> None:
    node, orthanc = node_and_orthanc(
        tmp_path,
        BUNDLED,
        delivery={"retry_backoff_seconds": 0.5, "retry_max_seconds": 1},
        study={"settle_seconds": 4},  # results come after Orthanc is down
    )
    try:
        study = ""
        for path in fracatlas_study(tmp_path / "fracatlas"):
            study = orthanc.upload(path)
        orthanc.send_study("node", study)
        orthanc.stop()  # the PACS goes down before the results are ready
        wait_for(lambda: "result_retry" in node.log_path.read_text(), 120, what="a failed try")
        orthanc.start()
        wait_for(
            lambda: (
                rows(node.database_url, "select count(*) from outbox where state != 'SENT'")
                == [(0,)]
            ),
            120,
            what="the results to be delivered after the PACS came back",
        )
        [(total,)] = rows(node.database_url, "select count(*) from outbox")
        counts = modality_counts(orthanc, study)
        assert counts["SR"] == 1 and counts["OT"] == 4
        assert counts["SR"] + counts["OT"] + counts.get("KO", 0) == total  # each exactly once
    finally:
        assert node.stop() == 0
        orthanc.stop()
