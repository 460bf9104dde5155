"""Security through the installed command: DICOM TLS (server certificate, client certificates)
checked with DCMTK ``storescu +tls``, private file permissions, crafted UIDs, and logs that hold
no patient data anywhere along the data path."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE

from tests.support.node import Node
from tests.support.onnx_models import write_model_dir
from tests.support.peers import StoreSCP, free_port, storescu, wait_for
from tests.support.pki import make_pki
from tests.support.synth import write_study_set


def tls_node(workdir: Path, pki: dict[str, Path], *, verify_client: bool) -> Node:
    dicom = {
        "tls_port": free_port(),
        "tls_cert_file": str(pki["server"]),
        "tls_key_file": str(pki["server-key"]),
        "tls_ca_file": str(pki["ca"]),
        "tls_verify_client": verify_client,
    }
    return Node(workdir, dicom=dicom).start()


def stored(node: Node) -> int:
    return int(node.sql("select count(*) as n from instances")[0]["n"])


def handshake_failures(node: Node) -> list[str]:
    return [r["message"] for r in node.log_records() if r.get("action") == "tls_handshake_failed"]


def test_tls_port_with_client_certificates(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    node = tls_node(tmp_path / "node", pki, verify_client=True)
    tls_port = node.sections["dicom"]["tls_port"]
    files = write_study_set(tmp_path / "set", 3, 64, 64)
    trust_node = ("+cf", str(pki["ca"]))
    try:
        sent = storescu(
            tls_port, files[:2], "+tls", str(pki["client-key"]), str(pki["client"]), *trust_node
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert stored(node) == 2

        # A certificate from a CA the node does not trust, none at all, or plain TCP: refused.
        rogue = storescu(
            tls_port, files[2:], "+tls", str(pki["rogue-key"]), str(pki["rogue"]), *trust_node
        )
        anonymous = storescu(tls_port, files[2:], "+tla", *trust_node)
        plain = storescu(tls_port, files[2:], timeout=60)
        for refused in (rogue, anonymous, plain):
            assert refused.returncode != 0, refused.stdout + refused.stderr
        assert stored(node) == 2
        wait_for(lambda: len(handshake_failures(node)) >= 3, 10, what="three handshake failures")
        reasons = " ".join(handshake_failures(node))
        assert "CERTIFICATE_VERIFY_FAILED" in reasons or "certificate verify failed" in reasons
        assert "CERTIFICATE" in reasons.upper()

        # The node's certificate is checked by the PACS too: without the CA, storescu refuses.
        unverified = storescu(
            tls_port, files[2:], "+tls", str(pki["client-key"]), str(pki["client"])
        )
        assert unverified.returncode != 0

        # The plain port is still served, and the TLS one still works after all that.
        assert storescu(node.port, files[2:]).returncode == 0
        assert stored(node) == 3
        _, report = node.status()  # (unhealthy anyway: this node has no worker for its jobs)
        assert report["listener"]["tls_port"] == tls_port
        assert report["listener"]["tls_listening"] is True
        assert not [p for p in report["problems"] if "TLS" in p]
    finally:
        assert node.stop() == 0
    accepted = [
        r
        for r in node.log_records()
        if r.get("action") == "association_accepted" and r["calling_ae"] != "TRIAGE_STATUS"
    ]
    assert len(accepted) == 2  # the TLS client with its certificate, and the plain one


def test_tls_port_without_client_certificates_takes_anonymous_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    node = tls_node(tmp_path / "node", pki, verify_client=False)
    files = write_study_set(tmp_path / "set", 2, 64, 64)
    try:
        sent = storescu(node.sections["dicom"]["tls_port"], files, "+tla", "+cf", str(pki["ca"]))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert stored(node) == 2
    finally:
        assert node.stop() == 0


def test_tls_misconfiguration_stops_the_service_with_a_clear_message(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    node = Node(tmp_path / "node", dicom={"tls_port": free_port()})
    result = node.command("serve", timeout=30)
    assert result.returncode == 2
    assert "dicom.tls_port: needs dicom.tls_cert_file and dicom.tls_key_file" in result.stderr

    node.sections["dicom"].update(
        {"tls_cert_file": str(pki["server"]), "tls_key_file": str(pki["client-key"])}
    )
    node.rewrite_config()
    result = node.command("serve", timeout=30)
    assert result.returncode == 1
    assert f"cannot load the TLS certificate {pki['server']}" in result.stderr
    assert "Traceback" not in result.stderr


def modes(root: Path) -> dict[str, set[int]]:
    found: dict[str, set[int]] = {"files": set(), "dirs": set()}
    for path in [root, *root.rglob("*")]:
        kind = "dirs" if path.is_dir() else "files"
        found[kind].add(stat.S_IMODE(path.stat().st_mode))
    return found


def test_files_are_readable_by_the_service_user_only(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "model")
    node = Node(tmp_path / "node", worker={"count": 1, "model_dir": str(model)}).start()
    files = write_study_set(tmp_path / "set", 4, 64, 64)
    try:
        assert storescu(node.port, files).returncode == 0
        wait_for(
            lambda: node.sql("select state from studies")[0]["state"] == "INFERRED",
            60,
            what="the study to be analysed",
        )
    finally:
        assert node.stop() == 0
    found = modes(node.data_dir)
    assert found["dirs"] == {0o700}, [oct(m) for m in found["dirs"]]
    assert found["files"] == {0o600}, [oct(m) for m in found["files"]]
    assert any((node.spool / "results").rglob("*.dcm"))  # result objects were checked too
    assert (node.data_dir / "triage-node.sqlite3").exists()


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_crafted_uids_cannot_leave_the_spool(tmp_path: Path, node: Node, keyword: str) -> None:
    [source] = write_study_set(tmp_path / "set", 1, 32, 32)
    ds = dcmread(source)
    crafted = "../../../../../../tmp/escaped" if keyword != "SOPInstanceUID" else "1.2/../../x"
    setattr(ds, keyword, crafted)
    if keyword == "SOPInstanceUID":
        ds.file_meta.MediaStorageSOPInstanceUID = crafted
    ae = AE(ae_title="ATTACKER")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="TRIAGE_NODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert 0xC000 <= status.Status <= 0xCFFF, hex(status.Status)
    assert "UID" in status.ErrorComment
    assert not Path("/tmp/escaped").exists()
    outside = [p for p in node.workdir.parent.rglob("*escaped*")]
    assert outside == [] and stored(node) == 0
    assert storescu(node.port, [source]).returncode == 0  # still serving


PATIENT = {
    "PatientName": "Qzxwv^Jorunn^Maria",
    "PatientID": "PID7Q3X9K",
    "AccessionNumber": "ACCK2Z8M5",
    "OtherPatientIDs": "OPIDW4R7",
    "PatientBirthDate": "19470312",
}


def test_no_log_line_anywhere_holds_patient_data(tmp_path: Path) -> None:
    """Receive, refuse, analyse, deliver and report on data with known patient values, with
    DEBUG logging in both log formats: none of the values appears in any line."""
    model = write_model_dir(tmp_path / "model")
    pacs = StoreSCP(tmp_path / "pacs")
    source_files = write_study_set(tmp_path / "set", 4, 64, 64)
    files = []
    for index, path in enumerate(source_files):
        ds = dcmread(path)
        for keyword, value in PATIENT.items():
            setattr(ds, keyword, value)
        ds.PatientComments = "called " + PATIENT["PatientName"]
        out = tmp_path / f"patient{index}.dcm"
        ds.save_as(out, enforce_file_format=True)
        files.append(out)
    for log_format in ("json", "text"):
        node = Node(
            tmp_path / log_format,
            worker={"count": 1, "model_dir": str(model)},
            delivery={"destinations": [f"STORESCP@127.0.0.1:{pacs.port}"], "interval_seconds": 0.2},
            log={"format": log_format, "level": "DEBUG"},
        ).start()
        try:
            assert storescu(node.port, files).returncode == 0
            refused = storescu(node.port, files[:1], called="NOT_THE_NODE")
            assert refused.returncode != 0
            wait_for(
                lambda node=node: (
                    node.sql("select count(*) as n from outbox where state = 'SENT'")[0]["n"] >= 3
                ),
                60,
                what="results delivered",
            )
            outputs = [node.command(*args).stdout for args in (("status",), ("worklist",))]
        finally:
            assert node.stop() == 0
        text = node.log() + "".join(outputs)
        assert "instance_stored" in text and "association_rejected" in text
        for value in PATIENT.values():
            for fragment in {value, *value.split("^")}:
                assert fragment not in text, f"{fragment!r} is in the {log_format} log"
    pacs.stop()


# The variables by which ONNX Runtime decides that it runs in CI, where it keeps its telemetry
# off by itself (its telemetry_environment.h, 1.32): removed so that a test sees what a hospital
# server would.
CI_VARIABLES = (
    "CI",
    "TF_BUILD",
    "GITHUB_ACTIONS",
    "GITLAB_CI",
    "CIRCLECI",
    "TRAVIS",
    "JENKINS_URL",
    "CODEBUILD_BUILD_ID",
    "BUILDKITE",
    "TEAMCITY_VERSION",
    "APPVEYOR",
    "BITBUCKET_BUILD_NUMBER",
    "SYSTEM_TEAMFOUNDATIONCOLLECTIONURI",
    "ORT_RUNNING_UNIT_TESTS",
    "ORT_DISABLE_TELEMETRY",
)


def test_onnx_runtime_telemetry_stays_off(tmp_path: Path) -> None:
    """ONNX Runtime's Linux wheels start Microsoft's usage telemetry when the library loads (a
    device id and an event cache under ~/.cache/Microsoft, uploaded to Microsoft's collector);
    the node, its worker and ``triage-node infer`` run models without it."""
    env = {k: v for k, v in os.environ.items() if k not in CI_VARIABLES}
    plain = tmp_path / "plain-home"
    plain.mkdir()
    subprocess.run(
        [sys.executable, "-c", "import onnxruntime"], env={**env, "HOME": str(plain)}, check=True
    )
    if not (plain / ".cache" / "Microsoft").exists():
        pytest.skip("this onnxruntime starts no telemetry of its own: nothing to switch off")

    home = tmp_path / "home"
    home.mkdir()
    model = write_model_dir(tmp_path / "model")
    node = Node(tmp_path / "node", worker={"count": 1, "model_dir": str(model)})
    node.env = {**env, "HOME": str(home)}
    node.start()
    try:
        files = write_study_set(tmp_path / "set", 2, 64, 64, per_study=2)
        assert storescu(node.port, files).returncode == 0
        wait_for(
            lambda: node.sql("select count(*) as n from image_results")[0]["n"] == 2,
            60,
            what="both images analysed",
        )
        inferred = node.command("infer", str(files[0]), "--model", str(model))
        assert inferred.returncode == 0, inferred.stderr
    finally:
        assert node.stop() == 0
    assert not (home / ".cache" / "Microsoft").exists()
