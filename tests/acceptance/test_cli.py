"""The installed ``triage-node`` command: status, db, build-dcmtk, serve refusals, logs without
patient data."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support.node import Node
from tests.support.onnx_models import write_model_dir
from tests.support.peers import (
    require_dcmtk_transport,
    storescu,
    triage_node_command,
    wait_for,
)
from tests.support.synth import (
    SYNTHETIC_ACCESSION,
    SYNTHETIC_PATIENT_ID,
    SYNTHETIC_PATIENT_NAME,
    write_study_set,
)
from triage_node.db.engine import head_revision


def status(node: Node) -> tuple[int, dict]:
    return node.status()


def test_status_of_a_healthy_node(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "model")
    node = Node(tmp_path / "node", worker={"count": 1, "model_dir": str(model)}).start()
    try:
        check_healthy_node(node, tmp_path)
    finally:
        assert node.stop() == 0


def check_healthy_node(node: Node, tmp_path: Path) -> None:
    files = write_study_set(tmp_path / "set", 4, 64, 64)
    assert storescu(node.port, files).returncode == 0
    wait_for(lambda: status(node)[1].get("studies") == {"INFERRED": 1}, 60, what="analysed")
    code, report = status(node)
    assert code == 0, report["problems"]
    assert report["healthy"] is True and report["problems"] == []
    assert report["listener"]["reachable"] is True
    assert report["listener"]["detail"] == "C-ECHO success"
    assert report["service"]["running"] is True
    assert report["database"]["schema_current"] is True
    assert report["jobs"] == {"DONE": 1}
    assert report["queue"] == {"queued": 0, "oldest_queued_age_s": None}
    assert [w["provider"] for w in report["workers"]] == ["CPUExecutionProvider"]
    assert report["model"]["ok"] and report["model"]["name"] == "tiny-test"
    assert report["instances"]["count"] == 4
    assert report["instances"]["last_received_age_s"] >= 0
    assert report["spool"]["ok"] is True and report["spool"]["bytes"] > 4 * 64 * 64 * 2
    text = node.command("status")
    assert text.returncode == 0 and "HEALTHY" in text.stdout


def test_status_of_a_stopped_node_is_unhealthy(node: Node) -> None:
    assert node.stop() == 0
    code, report = status(node)
    assert code == 1
    assert report["healthy"] is False
    assert report["listener"]["reachable"] is False
    assert report["service"]["running"] is False
    assert any("listener" in p for p in report["problems"])
    assert any("not running" in p for p in report["problems"])


def test_status_reports_low_disk(tmp_path: Path) -> None:
    node = Node(tmp_path).start()
    try:
        node.env["TRIAGE_NODE_STORAGE_MIN_FREE_MB"] = str(2**30)
        code, report = status(node)
        assert code == 1 and report["spool"]["ok"] is False
        assert any("free disk" in p for p in report["problems"])
    finally:
        node.env.pop("TRIAGE_NODE_STORAGE_MIN_FREE_MB")
        assert node.stop() == 0


def test_configuration_error_exits_2_naming_the_key(tmp_path: Path) -> None:
    env = {**os.environ, "TRIAGE_NODE_DICOM_PORT": "0"}
    result = subprocess.run(
        [triage_node_command(), "status"], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 2
    assert "dicom.port (TRIAGE_NODE_DICOM_PORT): must be between 1 and 65535" in result.stderr


def test_db_upgrade_and_current(tmp_path: Path, database_url: str) -> None:
    node = Node(tmp_path, database_url=database_url)
    if database_url.startswith("sqlite"):
        node = Node(tmp_path)  # the embedded default in the data directory
    before = node.command("db", "current")
    assert before.returncode == 1 and "run 'triage-node db upgrade'" in before.stdout
    upgraded = node.command("db", "upgrade")
    assert upgraded.returncode == 0 and f"empty -> {head_revision()}" in upgraded.stdout
    after = node.command("db", "current")
    assert after.returncode == 0 and "(current)" in after.stdout


def test_build_dcmtk_prints_the_program_a_node_on_that_transport_runs(tmp_path: Path) -> None:
    expected = require_dcmtk_transport()  # built (or found) the way the tests build it
    node = Node(tmp_path)
    built = node.command("build-dcmtk")
    assert built.returncode == 0, built.stderr
    assert Path(built.stdout.strip()) == expected
    node.sections["dicom"]["transport"] = "dcmtk"
    node.rewrite_config()
    node.start()
    try:
        found = [r for r in node.log_records() if r.get("action") == "dicom_transport"]
        assert found and found[0]["program"] == str(expected)
        assert found[0]["message"] == "DICOM transport: dcmtk"
    finally:
        assert node.stop() == 0


def test_the_default_transport_is_dcmtks_where_the_system_has_it(tmp_path: Path) -> None:
    """dicom.transport = "auto" (the default; the tests' nodes name theirs): DCMTK's receiver
    on a machine that can build it, and what it receives is stored."""
    expected = require_dcmtk_transport()
    model = write_model_dir(tmp_path / "model")
    node = Node(tmp_path / "node", worker={"count": 1, "model_dir": str(model)})
    del node.sections["dicom"]["transport"]
    node.rewrite_config()
    node.start()
    try:
        found = [r for r in node.log_records() if r.get("action") == "dicom_transport"]
        assert found and found[0]["message"] == "DICOM transport: dcmtk (auto)"
        assert found[0]["program"] == str(expected)
        wait_for(
            lambda: node.log().count('"dcmtk_receiver_started"') == 2, 30, what="both receivers"
        )
        check_healthy_node(node, tmp_path)
    finally:
        assert node.stop() == 0


def test_serve_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    model = write_model_dir(tmp_path / "model")
    node = Node(
        tmp_path / "node",
        database_url=postgres_url,
        worker={"count": 1, "model_dir": str(model)},
    ).start()
    try:
        check_healthy_node(node, tmp_path)
        report = status(node)[1]
        assert report["database"]["url"].startswith("postgresql+psycopg://")
    finally:
        assert node.stop() == 0


def test_second_serve_on_same_data_dir_is_refused(node: Node) -> None:
    result = subprocess.run(
        [triage_node_command(), "--config", str(node.config_path), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        env=node.env,
        check=False,
    )
    assert result.returncode == 1
    assert "another 'triage-node serve' already uses the data directory" in result.stderr


def test_port_in_use_is_a_clear_error(node: Node, tmp_path: Path) -> None:
    other = Node(tmp_path / "other")
    other.sections["dicom"]["port"] = node.port
    from tests.support.node import write_config

    write_config(other.config_path, other.sections)
    result = other.command("serve")
    assert result.returncode == 1
    assert f"port {node.port} on 127.0.0.1 is already in use" in result.stderr


def test_logs_hold_no_patient_data(node: Node, tmp_path: Path) -> None:
    files = write_study_set(tmp_path / "set", 8, 64, 64)
    assert storescu(node.port, files).returncode == 0
    wait_for(lambda: status(node)[1].get("studies") == {"QUEUED": 2}, 20, what="queued")
    assert node.stop() == 0
    log = node.log()
    assert "instance_stored" in log  # DEBUG logging was on, so every store was logged
    for secret in (SYNTHETIC_PATIENT_NAME, "SYNTHETIC", SYNTHETIC_PATIENT_ID, SYNTHETIC_ACCESSION):
        assert secret not in log


def test_status_before_first_start_creates_nothing(tmp_path: Path) -> None:
    node = Node(tmp_path)
    code, report = status(node)
    assert code == 1
    assert "database file does not exist" in report["problems"]
    assert not node.data_dir.exists()


def test_database_errors_are_reported_without_traceback(tmp_path: Path) -> None:
    node = Node(tmp_path, database_url="postgresql+psycopg://nobody@127.0.0.1:1/none")
    result = node.command("db", "upgrade")
    assert result.returncode == 1
    assert result.stderr.startswith("triage-node: database error: OperationalError")
    assert "Traceback" not in result.stderr
