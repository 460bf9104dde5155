"""Results written back: the node sends SR, heatmap SCs and KOS to a real SCP (DCMTK storescp),
each valid for dciodvfy; a destination that is down gets them once it is back."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from tests.support.node import Node
from tests.support.onnx_models import write_model_dir
from tests.support.peers import (
    StoreSCP,
    dciodvfy_errors,
    free_port,
    sr_validator_findings_each,
    storescu,
    triage_node_command,
    wait_for,
)
from tests.support.synth import write_study_set

EVERYTHING_POSITIVE = {
    "high_sensitivity": {"threshold": 0.0, "sensitivity": 1.0},
    "high_specificity": {"threshold": 1.0, "specificity": 1.0},
}
SR, SC, KO = (
    "1.2.840.10008.5.1.4.1.1.88.34",
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.88.59",
)


def received(directory: Path) -> list[pydicom.Dataset]:
    """What storescp has written there, whole: a file it is still writing (it writes in place,
    then answers) is left for the next look."""
    if not directory.is_dir():
        return []
    datasets = []
    for path in sorted(directory.iterdir()):
        if path.is_file():
            try:
                datasets.append(pydicom.dcmread(path))
            except (InvalidDicomError, EOFError, OSError):
                continue
    return datasets


def by_class(datasets: list[pydicom.Dataset]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ds in datasets:
        counts[str(ds.SOPClassUID)] = counts.get(str(ds.SOPClassUID), 0) + 1
    return counts


def delivering_node(tmp_path: Path, port: int, **delivery: object) -> Node:
    """A started node whose tiny model calls everything positive, sending to 127.0.0.1:*port*."""
    model = write_model_dir(tmp_path / "model", operating_points=EVERYTHING_POSITIVE)
    settings = {"destinations": [f"PACS@127.0.0.1:{port}"], "interval_seconds": 0.2, **delivery}
    return Node(
        tmp_path / "node", worker={"count": 1, "model_dir": str(model)}, delivery=settings
    ).start()


def test_results_reach_the_destination_and_are_valid(tmp_path: Path) -> None:
    pacs = StoreSCP(tmp_path / "pacs")
    node = delivering_node(tmp_path, pacs.port)
    try:
        files = write_study_set(tmp_path / "set", 2, 128, 96, per_study=2)
        assert storescu(node.port, files).returncode == 0
        wait_for(
            lambda: by_class(received(tmp_path / "pacs")) == {SR: 1, SC: 2, KO: 1},
            60,
            what="SR, 2 heatmaps and KOS at the PACS",
        )
        study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
        reports = []
        for path in sorted((tmp_path / "pacs").iterdir()):
            written = pydicom.dcmread(path)
            assert written.StudyInstanceUID == study_uid
            assert dciodvfy_errors(path) == [], path.name
            if written.SOPClassUID in (SR, KO):
                reports.append(path)
        assert sr_validator_findings_each(reports) == {path: [] for path in reports}
        listing = node.command("outbox", "list")
        assert listing.returncode == 0 and listing.stdout.count("SENT") == 4
    finally:
        assert node.stop() == 0
        pacs.stop()


def test_results_move_on_events_not_sweeps(tmp_path: Path) -> None:
    """With every sweep ten minutes apart, a study still goes from the association's end to
    results at the PACS at once: the end arms the settle timer, the queued job wakes the worker,
    the results wake the outbox (service/doorbell)."""
    pacs = StoreSCP(tmp_path / "pacs")
    model = write_model_dir(tmp_path / "model", operating_points=EVERYTHING_POSITIVE)
    node = Node(
        tmp_path / "node",
        service={"poll_seconds": 600},
        worker={"count": 1, "model_dir": str(model), "poll_seconds": 600},
        delivery={"destinations": [f"PACS@127.0.0.1:{pacs.port}"], "interval_seconds": 600},
    ).start()
    try:
        files = write_study_set(tmp_path / "set", 2, 128, 96, per_study=2)
        assert storescu(node.port, files).returncode == 0
        wait_for(  # well inside the first sweep, however slow the machine
            lambda: by_class(received(tmp_path / "pacs")) == {SR: 1, SC: 2, KO: 1},
            120,
            what="SR, 2 heatmaps and KOS at the PACS without a sweep",
        )
    finally:
        assert node.stop() == 0
        pacs.stop()


def test_a_worker_on_another_host_is_woken_through_postgresql(
    tmp_path: Path, postgres_url: str
) -> None:
    """``triage-node worker`` with its own data directory (another host: only the database and
    the spool are shared) claims a queued study at once and its results go out at once, with
    every sweep ten minutes apart: NOTIFY carries the "jobs" and "outbox" doorbells across."""
    pacs = StoreSCP(tmp_path / "pacs")
    model = write_model_dir(tmp_path / "model", operating_points=EVERYTHING_POSITIVE)
    node = Node(
        tmp_path / "node",
        database_url=postgres_url,
        service={"poll_seconds": 600},
        worker={"count": 0, "poll_seconds": 600},
        delivery={"destinations": [f"PACS@127.0.0.1:{pacs.port}"], "interval_seconds": 600},
    ).start()
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - owned by the child process
    worker = subprocess.Popen(
        [triage_node_command(), "--config", str(node.config_path), "worker"],
        env={
            **node.env,
            "TRIAGE_NODE_STORAGE_DATA_DIR": str(tmp_path / "other-host"),
            "TRIAGE_NODE_STORAGE_SPOOL_DIR": str(node.spool),
            "TRIAGE_NODE_WORKER_COUNT": "1",
            "TRIAGE_NODE_WORKER_MODEL_DIR": str(model),
        },
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:
        wait_for(
            lambda: "worker_started" in (tmp_path / "worker.log").read_text(),
            120,
            what="the other host's worker to load its model",
        )
        files = write_study_set(tmp_path / "set", 2, 128, 96, per_study=2)
        assert storescu(node.port, files).returncode == 0
        wait_for(  # well inside the first sweep, however slow the machine
            lambda: by_class(received(tmp_path / "pacs")) == {SR: 1, SC: 2, KO: 1},
            120,
            what="results from the other host's worker at the PACS without a sweep",
        )
    finally:
        worker.terminate()
        assert worker.wait(60) == 0
        assert node.stop() == 0
        pacs.stop()


def test_a_pacs_that_is_down_gets_the_results_when_it_is_back(tmp_path: Path) -> None:
    port = free_port()
    node = delivering_node(tmp_path, port, retry_backoff_seconds=0.5, retry_max_seconds=1)
    pacs = None
    try:
        files = write_study_set(tmp_path / "set", 1, 64, 64, per_study=1)
        assert storescu(node.port, files).returncode == 0
        wait_for(lambda: "result_retry" in node.log_path.read_text(), 60, what="a failed delivery")
        pacs = StoreSCP(tmp_path / "pacs", port=port)
        wait_for(
            lambda: by_class(received(tmp_path / "pacs")) == {SR: 1, SC: 1, KO: 1},
            60,
            what="the results once the PACS is back",
        )
        listing = node.command("outbox", "list")
        assert listing.stdout.count("SENT") == 3 and "PENDING" not in listing.stdout
    finally:
        assert node.stop() == 0
        if pacs is not None:
            pacs.stop()


def test_late_images_give_a_new_report_that_names_the_earlier_one(tmp_path: Path) -> None:
    pacs = StoreSCP(tmp_path / "pacs")
    node = delivering_node(tmp_path, pacs.port)
    try:
        files = write_study_set(tmp_path / "set", 2, 64, 64, per_study=2)
        assert storescu(node.port, files[:1]).returncode == 0
        wait_for(lambda: by_class(received(tmp_path / "pacs")).get(SR) == 1, 60, what="first SR")
        assert storescu(node.port, files[1:]).returncode == 0  # a late image of the same study
        wait_for(lambda: by_class(received(tmp_path / "pacs")).get(SR) == 2, 60, what="second SR")
        reports = [ds for ds in received(tmp_path / "pacs") if ds.SOPClassUID == SR]
        first = next(ds for ds in reports if "PredecessorDocumentsSequence" not in ds)
        second = next(ds for ds in reports if "PredecessorDocumentsSequence" in ds)
        [study] = second.PredecessorDocumentsSequence
        referenced = study.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert referenced.ReferencedSOPInstanceUID == first.SOPInstanceUID
        assert second.SOPInstanceUID != first.SOPInstanceUID
    finally:
        assert node.stop() == 0
        pacs.stop()


def test_dead_items_are_listed_and_sent_again_on_retry(tmp_path: Path) -> None:
    port = free_port()
    node = delivering_node(tmp_path, port, max_attempts=1)
    pacs = None
    try:
        files = write_study_set(tmp_path / "set", 1, 64, 64, per_study=1)
        assert storescu(node.port, files).returncode == 0
        wait_for(
            lambda: node.command("outbox", "list", "--state", "DEAD").stdout.count("DEAD") == 3,
            60,
            what="three dead items",
        )
        assert "result_dead" in node.log_path.read_text()
        pacs = StoreSCP(tmp_path / "pacs", port=port)
        result = node.command("outbox", "retry")
        assert result.returncode == 0 and "3 dead item(s) queued again" in result.stdout
        wait_for(
            lambda: by_class(received(tmp_path / "pacs")) == {SR: 1, SC: 1, KO: 1},
            60,
            what="the retried results",
        )
    finally:
        assert node.stop() == 0
        if pacs is not None:
            pacs.stop()


def test_status_shows_each_destination_and_turns_unhealthy_when_it_is_down(
    tmp_path: Path,
) -> None:
    pacs = StoreSCP(tmp_path / "pacs")
    node = delivering_node(tmp_path, pacs.port)
    try:
        files = write_study_set(tmp_path / "set", 1, 64, 64, per_study=1)
        assert storescu(node.port, files).returncode == 0
        wait_for(lambda: len(received(tmp_path / "pacs")) == 3, 60, what="the results")

        def outbox() -> dict[str, int]:
            report = json.loads(node.command("status", "--json").stdout)
            return dict(report["destinations"][0]["outbox"])

        # storescp writes a file before it answers, and the node records SENT on the answer
        wait_for(lambda: outbox().get("SENT") == 3, 30, what="the results recorded as sent")
        result = node.command("status", "--json")
        report = json.loads(result.stdout)
        assert result.returncode == 0, report["problems"]
        [destination] = report["destinations"]
        assert destination["destination"] == f"PACS@127.0.0.1:{pacs.port}"
        assert destination["reachable"] and destination["detail"] == "C-ECHO success"
        assert destination["outbox"] == {"PENDING": 0, "SENT": 3, "DEAD": 0}
        pacs.stop()
        result = node.command("status", "--json")
        report = json.loads(result.stdout)
        assert result.returncode == 1
        assert not report["destinations"][0]["reachable"]
        assert any("does not answer C-ECHO" in p for p in report["problems"])
        assert "destination PACS@127.0.0.1" in node.command("status").stdout
    finally:
        assert node.stop() == 0
        pacs.stop()  # again is harmless
