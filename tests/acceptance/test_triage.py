"""Triage end to end, through the installed command, with Orthanc as the PACS: positives are
flagged and ranked; a radiologist's SR stored in Orthanc, an HL7 ORU^R01 from the RIS, or
``mark-reported`` take them off the worklist; unreported ones are escalated once per interval;
``status --json`` follows docs/status.schema.json and ``/metrics`` shows the same figures."""

from __future__ import annotations

import itertools
import json
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from tests.support.hl7msgs import oru
from tests.support.node import Node
from tests.support.onnx_models import write_model_dir
from tests.support.orthanc import Orthanc, node_and_orthanc
from tests.support.peers import free_port, storescu, wait_for
from tests.support.synth import write_study_set
from triage_node.hl7.messages import parse
from triage_node.hl7.mllp import send

EVERYTHING_POSITIVE = {
    "high_sensitivity": {"threshold": 0.0, "sensitivity": 1.0},
    "high_specificity": {"threshold": 1.0, "specificity": 1.0},
}
ESCALATE_AFTER, ESCALATE_REPEAT = 4.0, 4.0


def status(node: Node) -> tuple[int, dict[str, Any]]:
    return node.status()


def worklist(node: Node) -> list[dict[str, Any]]:
    result = node.command("worklist", "--json")
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


def study_row(node: Node, study_uid: str) -> dict[str, Any]:
    [row] = node.sql("SELECT * FROM studies WHERE study_uid = :uid", uid=study_uid)
    return row


def radiologist_report(source: pydicom.Dataset, path: Path) -> Path:
    """A final, verified Comprehensive SR by a reporting system (not the node), on *source*."""
    for keyword in ("PatientBirthDate", "PatientSex", "ReferringPhysicianName", "StudyID"):
        if keyword not in source:
            setattr(source, keyword, "")
    container = hd.sr.ContainerContentItem(
        name=hd.sr.CodedConcept("18748-4", "LN", "Diagnostic imaging report"),
        template_id="2000",
    )
    container.ContentSequence = [
        hd.sr.TextContentItem(
            name=codes.DCM.Impression,
            value="No acute fracture.",
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    ]
    report = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=container,
        series_instance_uid=generate_uid(),
        series_number=90,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="Reporting Vendor",
        is_complete=True,
        is_final=True,
        is_verified=True,
        institution_name="Test Hospital",
        institutional_department_name="Radiology",
        verifying_observer_name="Reader^Rita",
        verifying_organization="Test Hospital",
    )
    report.save_as(path, enforce_file_format=True)
    return path


def ack_code(answer: bytes) -> str:
    message = parse(answer.decode())
    return message.component(message.all("MSA")[0], 1)


def metrics(port: int) -> str:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        return str(response.read().decode())


def three_studies(directory: Path) -> list[tuple[Path, str, str]]:
    """Three one-image studies with their own accession numbers: (file, study UID, accession)."""
    studies = []
    for number, path in enumerate(write_study_set(directory, 3, 96, 80, per_study=1)):
        ds = pydicom.dcmread(path)
        ds.AccessionNumber = f"ACC-{number}"
        ds.save_as(path, enforce_file_format=True)
        studies.append((path, str(ds.StudyInstanceUID), str(ds.AccessionNumber)))
    return studies


def test_flag_report_escalate_status_and_metrics(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "model", operating_points=EVERYTHING_POSITIVE)
    hl7_port, metrics_port = free_port(), free_port()
    node, orthanc = node_and_orthanc(
        tmp_path,
        model,
        reconcile={"interval_seconds": 0.5, "recheck_seconds": 0},
        escalation={
            "after_seconds": ESCALATE_AFTER,
            "repeat_seconds": ESCALATE_REPEAT,
            "interval_seconds": 0.5,
        },
        hl7={"port": hl7_port, "bind": "127.0.0.1"},
        service={"metrics_port": metrics_port},
    )
    try:
        studies = three_studies(tmp_path / "studies")
        for path, _, _ in studies:
            orthanc.send_study("node", orthanc.upload(path))
        (path_a, uid_a, _), (_, uid_b, accession_b), (_, uid_c, _) = studies
        wait_for(lambda: len(worklist(node)) == 3, 90, what="three flagged studies")
        entries = worklist(node)
        assert [e["rank"] for e in entries] == [1, 2, 3]
        assert {e["study_uid"] for e in entries} == {uid_a, uid_b, uid_c}
        assert all("accession" not in json.dumps(e).lower() for e in entries)

        # (1) C-FIND: a radiologist's SR stored in the study in Orthanc reports it.
        # The node's own SR is already in every study and must not count.
        wait_for(
            lambda: all(study_row(node, u)["checked_at"] for u in (uid_a, uid_b, uid_c)),
            30,
            what="each study looked up in Orthanc",
        )
        assert len(worklist(node)) == 3
        orthanc.upload(radiologist_report(pydicom.dcmread(path_a), tmp_path / "report.dcm"))
        wait_for(lambda: study_row(node, uid_a)["reported_at"], 30, what="C-FIND finds the SR")
        assert study_row(node, uid_a)["report_source"] == "c-find"
        shown = node.command("priority", uid_a, "--json")
        assert shown.returncode == 0, shown.stderr
        row_a = json.loads(shown.stdout)
        assert (row_a["state"], row_a["report_source"], row_a["rank"]) == (
            "REPORTED",
            "c-find",
            None,
        )
        assert row_a["outcome"] == "positive" and row_a["flagged_at"] <= row_a["reported_at"]
        assert node.command("priority", "1.2.3.4").returncode == 1

        # (2) HL7: a final ORU^R01 for B's accession number; a malformed one changes nothing.
        assert ack_code(send("127.0.0.1", hl7_port, b"MSH|^~\\&|broken", 10)) == "AR"
        assert ack_code(send("127.0.0.1", hl7_port, oru("F", accession_b, "R1"), 10)) == "AA"
        assert study_row(node, uid_b)["report_source"] == "hl7"
        assert [e["study_uid"] for e in worklist(node)] == [uid_c]

        # (3) Escalation: C stays unreported; escalated once per interval, its KOS re-sent.
        def escalation_times() -> list[datetime]:
            return [
                datetime.fromisoformat(r["time"])
                for r in node.log_records()
                if r.get("action") == "study_escalated" and r.get("study_uid") == uid_c
            ]

        wait_for(lambda: study_row(node, uid_c)["escalations"] >= 2, 60, what="two escalations")
        # each escalation is committed, then logged: its log line can come a moment later
        wait_for(lambda: len(escalation_times()) >= 2, 10, what="two escalations logged")
        escalated = escalation_times()
        assert len(escalated) >= 2
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(escalated)]
        assert all(gap >= ESCALATE_REPEAT - 0.1 for gap in gaps), gaps
        assert all(gap < ESCALATE_REPEAT + 3 for gap in gaps), gaps
        wait_for(
            lambda: "flag_objects_resent" in node.log() and kos_sent_after(node, uid_c),
            30,
            what="the KOS sent again after the escalation",
        )
        kos = [s for s in orthanc.series_of(study_of(orthanc, uid_c)) if is_kos(s)]
        assert sum(len(s["Instances"]) for s in kos) == 1  # the same KOS, not a second one

        # status: healthy, schema-valid, C ranked first and its age shown.
        code, report = status(node)
        assert code == 0, report["problems"]
        assert report["priority"] == {"REPORTED": 2, "FLAGGED": 1}
        unreported = report["unreported_positives"]
        assert unreported["total"] == 1 and unreported["studies"][0]["study_uid"] == uid_c
        assert unreported["studies"][0]["escalations"] >= 2
        assert unreported["oldest_age_s"] >= ESCALATE_AFTER
        assert report["reconcile"]["reachable"] and report["hl7"]["listening"]
        assert report["model"]["providers"] == ["CPUExecutionProvider"]
        human = node.command("status")
        assert "unreported positives: 1" in human.stdout and uid_c in human.stdout

        scraped = metrics(metrics_port)
        assert "triage_node_healthy 1.0" in scraped
        assert "triage_node_unreported_positives 1.0" in scraped
        assert 'triage_node_studies{state="REPORTED"} 2.0' in scraped
        pacs = f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"
        assert f'triage_node_destination_up{{destination="{pacs}"}} 1.0' in scraped
        assert 'triage_node_model_info{name="tiny-test"' in scraped

        # (3) mark-reported through the command.
        unknown = node.command("mark-reported", "1.2.3.4.5")
        assert unknown.returncode == 1 and "no such study" in unknown.stdout
        assert node.command("mark-reported").returncode == 2
        done = node.command("mark-reported", uid_c)
        assert done.returncode == 0 and "marked reported" in done.stdout
        assert node.command("worklist").stdout.strip() == "no unreported positive studies"
        assert study_row(node, uid_c)["report_source"] == "cli"

        # Unhealthy: the PACS goes away.
        orthanc.stop()
        code, report = status(node)
        assert code == 1 and report["healthy"] is False
        assert any("ORTHANC" in p and "C-ECHO" in p for p in report["problems"])
        assert any("report look-up" in p for p in report["problems"])
        assert "triage_node_healthy 0.0" in metrics(metrics_port)
    finally:
        assert node.stop() == 0, node.log()[-3000:]
        orthanc.stop()
    for secret in ("SYNTHETIC", "SYN-0001-PID", "ACC-0", "ACC-1", "ACC-2", "Reader^Rita"):
        assert secret not in node.log()


def study_of(orthanc: Orthanc, study_uid: str) -> str:
    found = orthanc.post(
        "/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}
    )
    return str(found[0])


def is_kos(series: dict[str, Any]) -> bool:
    return bool(series["MainDicomTags"].get("Modality") == "KO")


def kos_sent_after(node: Node, study_uid: str) -> bool:
    """The study's KOS was sent (again) after its latest escalation."""
    [sent] = node.sql(
        "SELECT o.sent_at, o.state, s.escalated_at FROM outbox o "
        "JOIN studies s ON s.id = o.study_id WHERE s.study_uid = :uid AND o.kind = 'ko'",
        uid=study_uid,
    )
    return bool(sent["state"] == "SENT" and sent["sent_at"] >= sent["escalated_at"])


def test_a_stuck_queue_is_unhealthy(tmp_path: Path) -> None:
    node = Node(tmp_path, worker={"count": 0}, service={"stuck_queue_seconds": 1}).start()
    try:
        files = write_study_set(tmp_path / "set", 1, 64, 64)
        assert storescu(node.port, files).returncode == 0
        wait_for(
            lambda: (status(node)[1]["queue"]["oldest_queued_age_s"] or 0) > 1.5,
            30,
            what="a job waiting",
        )
        code, report = status(node)
        assert code == 1
        assert any("oldest queued job has waited" in p for p in report["problems"])
        assert report["queue"]["queued"] == 1
    finally:
        assert node.stop() == 0
