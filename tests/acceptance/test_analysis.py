"""Receive -> queue -> worker -> results, through the installed command, with a real ONNX model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, text

from tests.support.node import Node
from tests.support.onnx_models import write_model_dir
from tests.support.peers import storescu, triage_node_command, wait_for
from tests.support.synth import write_study_set
from triage_node.db.database import Database
from triage_node.db.engine import make_engine


def rows(url: str, sql: str) -> list[tuple]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]
    finally:
        engine.dispose()


def test_serve_analyses_a_received_study(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "model", size=64)
    node = Node(tmp_path / "node", worker={"count": 1, "model_dir": str(model)}).start()
    try:
        files = write_study_set(tmp_path / "set", 3, 128, 96, per_study=3)
        assert storescu(node.port, files).returncode == 0
        wait_for(
            lambda: rows(node.database_url, "select state from studies") == [("INFERRED",)],
            60,
            what="the study to be analysed",
        )
        [(outcome, score, images, skipped, model_name, provider)] = rows(
            node.database_url,
            "select outcome, score, images, skipped, model_name, provider from study_results",
        )
        assert outcome in ("positive", "negative") and 0 < score < 1
        assert (images, skipped, model_name, provider) == (
            3,
            0,
            "tiny-test",
            "CPUExecutionProvider",
        )
        peaks = rows(node.database_url, "select peak_row, peak_column from image_results")
        assert len(peaks) == 3 and all(0 <= r < 128 and 0 <= c < 96 for r, c in peaks)
        report = json.loads(node.command("status", "--json").stdout)
        [worker] = report["workers"]
        assert worker["provider"] == "CPUExecutionProvider" and worker["model"] == "tiny-test"
        assert report["queue"]["queued"] == 0 and report["healthy"], report["problems"]
    finally:
        assert node.stop() == 0
    actions = [r.get("action") for r in node.log_records()]
    assert "model_loaded" in actions and "study_inferred" in actions


def test_status_is_unhealthy_when_jobs_wait_without_a_worker(tmp_path: Path) -> None:
    missing = tmp_path / "no-model-here"
    node = Node(tmp_path / "node", worker={"count": 1, "model_dir": str(missing)}).start()
    try:
        files = write_study_set(tmp_path / "set", 1, 64, 64, per_study=1)
        assert storescu(node.port, files).returncode == 0
        wait_for(lambda: rows(node.database_url, "select state from jobs") == [("QUEUED",)], 20)
        result = node.command("status", "--json")
        report = json.loads(result.stdout)
        assert result.returncode == 1 and report["workers"] == []
        assert "jobs are queued but no worker is running" in " ".join(report["problems"])
        assert report["model"]["ok"] is False and "does not exist" in report["model"]["error"]
    finally:
        assert node.stop() == 0
    unavailable = [r for r in node.log_records() if r.get("action") == "model_unavailable"]
    assert unavailable and str(missing) in unavailable[0]["message"]


def test_job_of_a_dead_worker_is_taken_over(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "model", size=64)
    node = Node(tmp_path / "node").start()  # receive only
    try:
        files = write_study_set(tmp_path / "set", 2, 64, 64, per_study=2)
        assert storescu(node.port, files).returncode == 0
        wait_for(lambda: rows(node.database_url, "select state from jobs") == [("QUEUED",)], 20)
    finally:
        assert node.stop() == 0
    # A worker claims the job and dies without a word (its lease is all that is left).
    engine = make_engine(node.database_url)
    dead = Database(engine).queue.claim("gone-host:1", datetime.now(UTC), timedelta(seconds=2))
    engine.dispose()
    assert dead is not None

    worker = subprocess.Popen(
        [triage_node_command(), "--config", str(node.config_path), "worker"],
        env={
            **node.env,
            "TRIAGE_NODE_WORKER_MODEL_DIR": str(model),
            "TRIAGE_NODE_WORKER_LEASE_SECONDS": "5",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: rows(node.database_url, "select state, attempts from jobs") == [("DONE", 2)],
            60,
            what="the job to be taken over and done",
        )
    finally:
        worker.terminate()
        assert worker.wait(60) == 0
    assert rows(node.database_url, "select outcome from studies")[0][0] in ("positive", "negative")


def test_infer_command_on_files(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "model", size=64)
    files = write_study_set(tmp_path / "set", 2, 100, 80, per_study=2)
    (tmp_path / "set" / "notes.txt").write_text("not DICOM")
    result = subprocess.run(
        [triage_node_command(), "infer", str(tmp_path / "set"), "--model", str(model), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    [study] = report["studies"]
    assert len(study["images"]) == 2 and study["outcome"] in ("positive", "negative")
    assert report["unreadable"][0]["file"].endswith("notes.txt")
    assert {Path(i["file"]).name for i in study["images"]} == {f.name for f in files}


def test_infer_with_a_damaged_model_is_refused(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "model", size=64)
    (model / "model.onnx").write_bytes(b"not the model")
    result = subprocess.run(
        [triage_node_command(), "infer", str(tmp_path), "--model", str(model)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "does not match the manifest" in result.stderr


def test_worker_killed_mid_job_loses_nothing(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "model", size=256)
    node = Node(tmp_path / "node").start()  # receive only; workers are started below
    try:
        files = write_study_set(tmp_path / "set", 16, 1500, 1500, per_study=16)
        assert storescu(node.port, files).returncode == 0
        wait_for(lambda: rows(node.database_url, "select state from jobs") == [("QUEUED",)], 20)
    finally:
        assert node.stop() == 0
    env = {
        **node.env,
        "TRIAGE_NODE_WORKER_MODEL_DIR": str(model),
        "TRIAGE_NODE_WORKER_LEASE_SECONDS": "5",
        "TRIAGE_NODE_WORKER_MAX_BATCH": "16",
    }
    command = [triage_node_command(), "--config", str(node.config_path), "worker"]
    first = subprocess.Popen(
        command,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: rows(node.database_url, "select state from jobs") == [("RUNNING",)],
            60,
            0.01,
            "a worker to start the job",
        )
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    assert rows(node.database_url, "select state from jobs") == [("RUNNING",)], "job ended early"
    assert rows(node.database_url, "select count(*) from study_results") == [(0,)]

    second = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        # The new worker service finds the job of the killed one's dead process and queues it
        # again at once, not counting the interrupted attempt (the service stopped, not the job).
        wait_for(
            lambda: rows(node.database_url, "select state, attempts from jobs") == [("DONE", 1)],
            90,
            what="the interrupted job queued again and done",
        )
    finally:
        second.terminate()
        assert second.wait(60) == 0
    assert rows(node.database_url, "select images from study_results") == [(16,)]
