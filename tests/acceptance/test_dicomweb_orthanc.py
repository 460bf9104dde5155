"""DICOMweb both ways with a real Orthanc and its DICOMweb plugin (Debian ``orthanc-dicomweb``).

Orthanc's own DICOMweb client sends a study to the node by STOW-RS (the node as a
``DicomWeb.Servers`` entry, with a bearer token); the node analyses it and sends its results
back by STOW-RS into the same study on Orthanc's DICOMweb server; sending the study again adds
nothing to Orthanc; a radiologist's SR stored into Orthanc takes the study off the worklist at
the next QIDO-RS look-up.
"""

from __future__ import annotations

from pathlib import Path

import pydicom

from tests.acceptance.test_delivery import EVERYTHING_POSITIVE, KO, SC, SR
from tests.acceptance.test_stow import rows
from tests.acceptance.test_triage import radiologist_report
from tests.support.node import Node
from tests.support.onnx_models import write_model_dir
from tests.support.orthanc import Orthanc
from tests.support.peers import free_port, sr_validator_findings, wait_for
from tests.support.synth import write_study_set
from triage_node.credentials import hash_secret

TOKEN = "orthanc-sends-with-this"


def classes_in(orthanc: Orthanc, study_id: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for series in orthanc.series_of(study_id):
        for instance in series["Instances"]:
            sop_class = orthanc.instance_tags(instance)["SOPClassUID"]
            counts[sop_class] = counts.get(sop_class, 0) + 1
    return counts


def test_orthanc_stows_to_the_node_and_gets_the_results_back_by_stow(tmp_path: Path) -> None:
    web_port = free_port()
    orthanc = Orthanc(
        tmp_path / "orthanc",
        {},
        dicomweb_servers={
            "node": {
                "Url": f"http://127.0.0.1:{web_port}/dicom-web/",
                "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"},
            }
        },
    ).start()
    model = write_model_dir(tmp_path / "model", operating_points=EVERYTHING_POSITIVE)
    token_file = tmp_path / "orthanc-token"
    token_file.write_text("unused: Orthanc's server here asks for no credentials\n")
    node = Node(
        tmp_path / "node",
        dicomweb={
            "port": web_port,
            "bind": "127.0.0.1",
            "tokens": [hash_secret(TOKEN, iterations=10_000)],
        },
        worker={"count": 1, "model_dir": str(model)},
        delivery={
            "destinations": [orthanc.dicomweb_url],
            "interval_seconds": 0.5,
            "web_token_file": str(token_file),
        },
        reconcile={"pacs": orthanc.dicomweb_url, "interval_seconds": 0.5, "recheck_seconds": 0},
    ).start()
    try:
        files = write_study_set(tmp_path / "set", 2, 128, 96, per_study=2)
        study_ids = {orthanc.upload(f) for f in files}
        [study_id] = study_ids
        answer = orthanc.stow_study("node", study_id)
        assert answer is None or "Error" not in str(answer)
        wait_for(
            lambda: (
                classes_in(orthanc, study_id).get(SR) == 1
                and classes_in(orthanc, study_id).get(SC) == 2
                and classes_in(orthanc, study_id).get(KO) == 1
            ),
            180,
            what="SR, 2 heatmaps and KOS back in Orthanc's study by STOW-RS",
        )
        before = classes_in(orthanc, study_id)
        listing = node.command("outbox", "list")
        assert listing.returncode == 0 and listing.stdout.count("SENT") == 4, listing.stdout
        assert orthanc.dicomweb_url in listing.stdout
        # The report Orthanc holds is the node's, template-exact.
        [sr_series] = [
            s for s in orthanc.series_of(study_id) if s["MainDicomTags"].get("Modality") == "SR"
        ]
        report = tmp_path / "report.dcm"
        report.write_bytes(orthanc.instance_file(sr_series["Instances"][0]))
        assert pydicom.dcmread(report).Manufacturer == "triage-node"
        assert sr_validator_findings(report) == []
        # Sent again: the study re-opens and is analysed again with the same content, so the
        # same result objects (same UIDs) go out again and Orthanc's study gains nothing.
        orthanc.stow_study("node", study_id)
        wait_for(
            lambda: (
                rows(node, "select count(*) from jobs where state = 'DONE'") == [(2,)]
                and rows(node, "select count(*) from outbox where state <> 'SENT'") == [(0,)]
            ),
            180,
            what="the second analysis and its delivery",
        )
        assert classes_in(orthanc, study_id) == before
        # Only the node's own objects are there: still unreported. A radiologist reports.
        study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        assert rows(node, "select reported_at from studies") == [(None,)]
        orthanc.upload(radiologist_report(pydicom.dcmread(files[0]), tmp_path / "report-sr.dcm"))
        wait_for(
            lambda: (
                rows(node, "select report_source from studies where study_uid = :u", u=study_uid)
                == [("qido-rs",)]
            ),
            60,
            what="the QIDO-RS look-up to find the radiologist's report",
        )
    finally:
        assert node.stop() == 0
        orthanc.stop()
