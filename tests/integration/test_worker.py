"""Worker behaviour against a real database, spool and ONNX model (in-process)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select

from tests.support.onnx_models import write_model_dir
from tests.support.synth import write_study_set
from triage_node.analysis.runtime import ModelSession
from triage_node.config import WorkerConfig
from triage_node.db.database import Database
from triage_node.db.schema import jobs, studies
from triage_node.dicom.storing import read_header
from triage_node.domain import utcnow
from triage_node.service.worker import Worker
from triage_node.spool import Spool


def stored_study(store: Database, spool: Spool, tmp_path: Path, count: int) -> list[Path]:
    """Spool *count* synthetic images of one study exactly as the receiver would, and queue it."""
    files = write_study_set(tmp_path / "set", count, 96, 80, per_study=count)
    now = utcnow() - timedelta(minutes=1)
    for path in files:
        partial = spool.incoming_dir() / "partial.dcm"
        partial.write_bytes(path.read_bytes())
        h = read_header(partial)
        assert h.sop_instance_uid == str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        store.intake.record_instance(h, spool.commit(partial, h), None, now)
    [ready] = store.intake.ready_studies(utcnow(), timedelta(seconds=1), timedelta(hours=1))
    assert store.queue.enqueue(ready, utcnow()) is not None
    return files


def test_worker_analyses_and_records(store: Database, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    stored_study(store, spool, tmp_path, 3)
    model = ModelSession(write_model_dir(tmp_path / "model", size=64))
    worker = Worker(
        store.queue, store.outbox, store.processes, spool, model, WorkerConfig(), name="w1"
    )
    assert worker.run_once() is True
    assert worker.run_once() is False  # nothing left
    with store.engine.connect() as conn:
        assert conn.execute(select(jobs.c.state, jobs.c.attempts)).one() == ("DONE", 1)
        assert conn.execute(select(studies.c.state)).scalar_one() == "INFERRED"


def test_worker_that_cannot_read_the_spool_gives_the_job_back(
    store: Database, tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    stored_study(store, spool, tmp_path, 2)
    # This host sees an empty mount where the spool should be.
    elsewhere = Spool(tmp_path / "not-mounted")
    elsewhere.prepare()
    model = ModelSession(write_model_dir(tmp_path / "model", size=64))
    assert (
        Worker(
            store.queue,
            store.outbox,
            store.processes,
            elsewhere,
            model,
            WorkerConfig(),
            name="blind",
        ).run_once()
        is True
    )
    with store.engine.connect() as conn:
        state, attempts, error = conn.execute(
            select(jobs.c.state, jobs.c.attempts, jobs.c.last_error)
        ).one()
    assert (state, attempts) == ("QUEUED", 0) and "cannot read spooled file" in error


def test_a_worker_counts_the_jobs_it_did_in_its_heartbeat(store: Database, tmp_path: Path) -> None:
    """``status`` lists each live worker with its jobs done (it used to say 0 for ever)."""
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    stored_study(store, spool, tmp_path, 1)
    model = ModelSession(write_model_dir(tmp_path / "model", size=64))
    worker = Worker(
        store.queue, store.outbox, store.processes, spool, model, WorkerConfig(), name="w1"
    )
    worker.heartbeat()
    since = utcnow() - timedelta(minutes=1)
    assert [w.jobs_done for w in store.processes.live_workers(since)] == [0]
    assert worker.run_once() is True
    worker.heartbeat()
    assert [w.jobs_done for w in store.processes.live_workers(since)] == [1]
