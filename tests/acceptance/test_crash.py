"""Crash consistency: SIGKILL the whole service at seeded random moments while it receives,
analyses and delivers, restart it, and let the PACS resend what it saw refused. In the end every
acknowledged instance is stored byte for byte, every study is analysed and its results are in
Orthanc exactly once (a re-run of the same content makes the same objects), and nothing is left
queued, running or pending."""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.support.node import Node
from tests.support.onnx_models import write_model_dir
from tests.support.orthanc import node_and_orthanc
from tests.support.peers import acknowledged, dataset_bytes, storescu_process, wait_for
from tests.support.synth import write_study_set

ROUNDS = 24
SEED = 20261123
PER_STUDY, STUDIES_PER_ROUND = 3, 2
PHASES = ("receiving", "analysing", "delivering")


def count(node: Node, query: str) -> int:
    try:
        return int(node.sql(query)[0]["n"])
    except Exception:  # the database may be mid-creation right after a start
        return 0


def phase_at_kill(node: Node) -> set[str]:
    """What the killed service was doing: read from the rows its kill froze."""
    phases = set()
    if count(node, "select count(*) as n from associations where ended_at is null"):
        phases.add("receiving")
    if count(node, "select count(*) as n from jobs where state = 'RUNNING'"):
        phases.add("analysing")
    if count(node, "select count(*) as n from outbox where state = 'PENDING'"):
        phases.add("delivering")
    return phases


def wait_for_phase(node: Node, phase: str, rng: random.Random, deadline: float) -> None:
    """Wait until the service is in *phase*, then a seeded random moment more."""
    queries = {
        "receiving": "select count(*) as n from instances",
        "analysing": "select count(*) as n from jobs where state = 'RUNNING'",
        "delivering": "select count(*) as n from outbox where state = 'PENDING'",
    }
    baseline = count(node, queries[phase]) if phase == "receiving" else 0
    while time.monotonic() < deadline and count(node, queries[phase]) <= baseline:
        time.sleep(0.005)
    time.sleep(rng.uniform(0, {"receiving": 0.02, "analysing": 0.05, "delivering": 0.05}[phase]))


@pytest.mark.long
def test_sigkill_at_random_moments_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    model = write_model_dir(tmp_path / "model")
    node, orthanc = node_and_orthanc(
        tmp_path,
        model,
        worker={"lease_seconds": 5, "retry_backoff_seconds": 0},
        delivery={"retry_backoff_seconds": 0.2, "retry_max_seconds": 1},
        escalation={"after_seconds": 0},
    )
    acked: list[Path] = []
    to_send: list[Path] = []
    hit: Counter[str] = Counter()
    try:
        for round_number in range(ROUNDS):
            fresh = write_study_set(
                tmp_path / f"round{round_number:02d}",
                PER_STUDY * STUDIES_PER_ROUND,
                512,
                512,
                per_study=PER_STUDY,
            )
            to_send += fresh
            phase = PHASES[round_number % len(PHASES)]
            sender = storescu_process(node.port, to_send)
            wait_for_phase(node, phase, rng, time.monotonic() + 20)
            node.kill()
            output, _ = sender.communicate(timeout=60)
            done = acknowledged(output)
            acked += done
            to_send = [f for f in to_send if f not in done]  # the PACS retries the rest
            hit.update(phase_at_kill(node))
            node.start()

        if to_send:
            final = storescu_process(node.port, to_send)
            output, _ = final.communicate(timeout=120)
            acked += acknowledged(output)
            to_send = [f for f in to_send if f not in acknowledged(output)]
        assert to_send == []

        def drained() -> bool:
            busy = count(
                node,
                "select count(*) as n from jobs where state in ('QUEUED', 'RUNNING')",
            ) + count(node, "select count(*) as n from outbox where state != 'SENT'")
            studies = node.sql("select state, count(*) as n from studies group by state")
            return busy == 0 and [r["state"] for r in studies] == ["INFERRED"]

        wait_for(drained, 180, 0.5, "every study analysed and every result delivered")
        check_instances(node, acked)
        check_results(node, orthanc, acked)
    finally:
        if node.process is not None:
            assert node.stop() == 0
        orthanc.stop()
    print(f"kills landed while {dict(hit)} over {ROUNDS} rounds")
    for phase in PHASES:
        assert hit[phase] >= 3, f"only {hit[phase]} kills landed while {phase}: {dict(hit)}"


def check_instances(node: Node, acked: list[Path]) -> None:
    rows = {
        r["sop_instance_uid"]: r["path"]
        for r in node.sql("select sop_instance_uid, path from instances")
    }
    for path in acked:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert uid in rows, f"{path} was acknowledged but is not in the database"
        assert dataset_bytes(node.spool / rows[uid]) == dataset_bytes(path), path
    assert not [p for p in (node.spool / "incoming").rglob("*") if p.is_file()]


def check_results(node: Node, orthanc: object, acked: list[Path]) -> None:
    from tests.support.orthanc import Orthanc

    assert isinstance(orthanc, Orthanc)
    in_pacs = orthanc.post("/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})
    pacs_uids = Counter(i["MainDicomTags"]["SOPInstanceUID"] for i in in_pacs)
    outbox = node.sql(
        "select s.study_uid, o.kind, o.result_version, o.sop_instance_uid from outbox o "
        "join studies s on s.id = o.study_id"
    )
    # Exactly the objects the node made, each once; nothing it did not make.
    assert set(pacs_uids) == {r["sop_instance_uid"] for r in outbox}
    assert max(pacs_uids.values()) == 1

    acked_by_study: dict[str, set[str]] = {}
    for path in acked:
        ds = dcmread(path, stop_before_pixels=True)
        acked_by_study.setdefault(str(ds.StudyInstanceUID), set()).add(str(ds.SOPInstanceUID))
    sr_in_pacs: Counter[str] = Counter(
        r["study_uid"] for r in outbox if r["kind"] == "sr" and r["sop_instance_uid"] in pacs_uids
    )
    one_result_set = 0
    for study_uid, sops in acked_by_study.items():
        results = node.sql(
            "select r.id, i.sop_instance_uid from study_results r "
            "join studies s on s.id = r.study_id "
            "join image_results ir on ir.study_result_id = r.id "
            "join instances i on i.id = ir.instance_id where s.study_uid = :u order by r.id",
            u=study_uid,
        )
        analysed: dict[int, set[str]] = {}
        for row in results:
            analysed.setdefault(row["id"], set()).add(row["sop_instance_uid"])
        contents = {frozenset(images) for images in analysed.values()}
        # One SR in the PACS per distinct content analysed (a re-run of the same images makes
        # the same objects); the newest analysis covers every acknowledged image.
        assert sr_in_pacs[study_uid] == len(contents), study_uid
        assert sops <= analysed[max(analysed)], f"{study_uid}: newest result misses images"
        one_result_set += sr_in_pacs[study_uid] == 1
    print(
        f"{len(acked_by_study)} studies, {one_result_set} with one result set, the rest "
        "superseded after a kill in the middle of the study"
    )
