"""Load: 8 concurrent DCMTK associations send 500 radiographs in all to the service analysing
with the bundled model. No failure status, the queue drains, and the memory (RSS) of the whole
service stays bounded: the second half of the load does not grow it."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from tests.support.node import Node, process_group_members
from tests.support.peers import acknowledged, storescu_process, wait_for
from tests.support.synth import write_study_set

BUNDLED = Path(__file__).resolve().parents[2] / "models" / "fracture-v1"
ASSOCIATIONS = 8
INSTANCES = 500
PER_STUDY = 4
MOST_RSS_MIB = 2048  # the whole service: supervisor, receivers and a worker with the model
MOST_GROWTH = 1.25  # peak RSS of the second half / the first half


def service_rss_mib(node: Node) -> float:
    """Resident memory of every process of the service (its process group), in MiB."""
    assert node.process is not None
    total = 0
    for pid in process_group_members(os.getpgid(node.process.pid)):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue  # ended meanwhile
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


class RssSampler:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, service_rss_mib(self.node))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def share(files: list[Path], association: int) -> list[Path]:
    """The studies (of PER_STUDY consecutive files) this association sends, whole, as a PACS
    sends a study in one association."""
    return [f for n, f in enumerate(files) if (n // PER_STUDY) % ASSOCIATIONS == association]


def send_concurrently(node: Node, files: list[Path]) -> list[Path]:
    """ASSOCIATIONS storescu processes at once; returns the files acknowledged with Success."""
    senders = [storescu_process(node.port, share(files, i)) for i in range(ASSOCIATIONS)]
    done = []
    for sender in senders:
        output, _ = sender.communicate(timeout=600)
        assert sender.returncode == 0, output[-2000:]
        assert "Received Store Response (Success)" in output
        assert not [line for line in output.splitlines() if "Store Response (" in line
                    and "Success" not in line], output[-2000:]  # fmt: skip
        done += acknowledged(output)
    return done


def drained(node: Node) -> bool:
    jobs = node.sql("select count(*) as n from jobs where state in ('QUEUED', 'RUNNING')")
    studies = node.sql("select count(*) as n from studies where state != 'INFERRED'")
    return jobs[0]["n"] == 0 and studies[0]["n"] == 0


@pytest.mark.long
def test_eight_associations_500_radiographs(tmp_path: Path) -> None:
    files = write_study_set(tmp_path / "set", INSTANCES, 512, 512, per_study=PER_STUDY)
    node = Node(
        tmp_path / "node",
        worker={"count": 1, "model_dir": str(BUNDLED)},
        dicom={"receivers": 2},
    ).start()
    half = INSTANCES // 2
    try:
        started = time.monotonic()
        with RssSampler(node) as first:
            acked = send_concurrently(node, files[:half])
            wait_for(lambda: drained(node), 600, 0.5, "the first half analysed")
        with RssSampler(node) as second:
            acked += send_concurrently(node, files[half:])
            wait_for(lambda: drained(node), 600, 0.5, "the queue to drain")
        elapsed = time.monotonic() - started
        assert len(acked) == INSTANCES
        assert node.sql("select count(*) as n from instances")[0]["n"] == INSTANCES
        analysed = node.sql(
            "select count(distinct instance_id) as n from image_results "
            "where probability is not null"
        )
        assert analysed[0]["n"] == INSTANCES
        code, report = node.status()
        assert code == 0, report["problems"]
    finally:
        assert node.stop() == 0
    print(
        f"{INSTANCES} instances over {ASSOCIATIONS} associations, received and analysed in "
        f"{elapsed:.0f} s; service RSS peak {first.peak:.0f} MiB (first half), "
        f"{second.peak:.0f} MiB (second half)"
    )
    assert max(first.peak, second.peak) < MOST_RSS_MIB
    assert second.peak <= first.peak * MOST_GROWTH
