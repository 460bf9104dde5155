"""Retention through the installed command: spooled files of analysed, delivered studies go
after ``retention.spool_days``, and ``status`` says so."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from tests.support.node import Node
from tests.support.onnx_models import write_model_dir
from tests.support.peers import StoreSCP, free_port, storescu, wait_for
from tests.support.synth import write_study_set

SECONDS = 1 / 86400  # retention settings are in days
EVERYTHING_NEGATIVE = {  # unreported positives are kept, so this test makes none
    "high_sensitivity": {"threshold": 1.0, "sensitivity": 0.9},
    "high_specificity": {"threshold": 1.0, "specificity": 0.9},
}


def test_spool_is_purged_after_delivery_and_status_shows_it(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "model", operating_points=EVERYTHING_NEGATIVE)
    metrics_port = free_port()
    pacs = StoreSCP(tmp_path / "pacs")
    node = Node(
        tmp_path / "node",
        worker={"count": 1, "model_dir": str(model)},
        delivery={"destinations": [f"STORESCP@127.0.0.1:{pacs.port}"], "interval_seconds": 0.2},
        retention={"spool_days": 3 * SECONDS, "priority_days": 30, "interval_seconds": 1},
        service={"metrics_port": metrics_port},
    ).start()
    files = write_study_set(tmp_path / "set", 8, 64, 64)
    try:
        assert storescu(node.port, files).returncode == 0
        code, report = node.status()
        assert report["retention"]["instances_on_disk"] == 8
        wait_for(
            lambda: node.status()[1]["retention"]["studies_purged"] == 2,
            60,
            what="both studies purged",
        )
        code, report = node.status()
        retention = report["retention"]
        assert code == 0, report["problems"]
        assert retention["instances_on_disk"] == 0 and retention["oldest_on_disk_age_s"] is None
        assert retention["files_removed"] == 2 * (4 + 1 + 4)  # images, SR, heatmaps per study
        assert retention["bytes_freed"] > 8 * 64 * 64 * 2
        assert retention["spool_days"] == 3 * SECONDS and retention["last_run_age_s"] < 10
        assert report["instances"]["bytes"] == 0 and report["instances"]["count"] == 8
        left = [p for p in node.spool.rglob("*") if p.is_file()]
        assert left == []
        assert report["priority"] == {"INFERRED": 2}
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            scraped = response.read().decode()
        assert "triage_node_instances_on_disk 0.0" in scraped
        assert "triage_node_retention_purged_studies 2.0" in scraped
        # A resend of a purged study is received and analysed again, and purged again.
        assert storescu(node.port, files[:4]).returncode == 0
        assert node.status()[1]["retention"]["instances_on_disk"] == 4
        wait_for(
            lambda: node.status()[1]["retention"]["studies_purged"] == 3,
            60,
            what="the resent study analysed, delivered and purged",
        )
        assert node.sql("select max(revision) as r from studies")[0]["r"] == 2
    finally:
        assert node.stop() == 0
        pacs.stop()
    purged = [r for r in node.log_records() if r.get("action") == "study_purged"]
    assert len(purged) >= 2 and all("study_uid" in r for r in purged)
