"""No loss: SIGKILL the whole service mid-send; everything storescu saw acknowledged survives
(on both databases, and on both DICOM transports)."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import IO

import pytest
from pydicom import dcmread
from sqlalchemy import create_engine, text

from tests.support.node import Node
from tests.support.peers import (
    acknowledged,
    dataset_bytes,
    storescu_process,
    transport_settings,
    wait_for,
)
from tests.support.synth import write_study_set


def studies_by_state(url: str) -> dict[str, int]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("select state, count(*) from studies group by state")).all()
    finally:
        engine.dispose()
    return {state: int(n) for state, n in rows}


def read_until_acknowledged(sender: subprocess.Popen[str], count: int, timeout: float) -> str:
    """storescu's output up to the line of its *count*-th Success response."""
    assert sender.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=_read_lines, args=(sender.stdout, lines, count), daemon=True)
    reader.start()
    reader.join(timeout)
    assert not reader.is_alive(), f"storescu did not get {count} responses in {timeout} s"
    return "".join(lines)


def _read_lines(stream: IO[str], lines: list[str], count: int) -> None:
    for line in stream:
        lines.append(line)
        if len(acknowledged("".join(lines))) >= count:
            return


@pytest.mark.parametrize(
    ("backend", "transport"),
    [("sqlite", "pynetdicom"), ("postgresql", "pynetdicom"), ("sqlite", "dcmtk")],
)
def test_sigkill_during_send_loses_nothing_acknowledged(
    tmp_path: Path, backend: str, transport: str, request: pytest.FixtureRequest
) -> None:
    url = "" if backend == "sqlite" else str(request.getfixturevalue("postgres_url"))
    files = write_study_set(tmp_path / "set", 200, 256, 256, per_study=4)
    dicom = transport_settings(transport)
    node = Node(tmp_path / "node", database_url=url, dicom=dicom).start()
    sender = storescu_process(node.port, files)
    # Kill on an observed event, not after a time: once storescu has printed its 60th Success
    # response (the node's own count can run ahead of what reached the sender).
    output = read_until_acknowledged(sender, 60, timeout=120)
    node.kill()
    rest, _ = sender.communicate(timeout=60)
    acked = acknowledged(output + rest)
    assert 60 <= len(acked) < len(files), f"kill did not land mid-send ({len(acked)} acked)"

    node.start()  # same data directory and database
    engine = create_engine(node.database_url)
    try:
        with engine.connect() as conn:
            rows = dict(conn.execute(text("select sop_instance_uid, path from instances")).all())
            lost = conn.execute(
                text("select count(*) from associations where end_reason = 'LOST'")
            ).scalar_one()
    finally:
        engine.dispose()
    for path in acked:
        sop_uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert sop_uid in rows, f"{path.name} was acknowledged but is not in the database"
        stored = node.spool / rows[sop_uid]
        assert dataset_bytes(stored) == dataset_bytes(path), f"{path.name} differs on disk"
    assert lost >= 1  # the killed association was found and closed at restart
    partial = [p for p in (node.spool / "incoming").rglob("*") if p.is_file()]
    assert partial == [], "partial files of the killed receivers were not purged"
    # Studies interrupted by the kill settle and are queued once the lost association is closed.
    wait_for(
        lambda: list(studies_by_state(node.database_url)) == ["QUEUED"],
        30,
        what="every received study to be queued",
    )
    assert node.stop() == 0
