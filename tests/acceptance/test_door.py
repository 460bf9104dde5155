"""Holding the door: a host that opens many connections and sends half a request, or keeps
established associations idle, cannot lock the PACS out (issue 15).

The attacker runs from 127.0.0.2 and reconnects whenever it is cut off; the PACS (DCMTK storescu)
sends from 127.0.0.1 meanwhile. Sizes are small enough for CI (``DOOR_SECONDS``,
``DOOR_HALF_OPEN`` and ``DOOR_IDLE`` make it the full two-minute, 500 + 100 run).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import threading
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import create_engine, text

from tests.support.node import Node
from tests.support.onnx_models import write_model_dir
from tests.support.pdus import association_request
from tests.support.peers import require_tool, storescu, wait_for
from tests.support.synth import write_study_set

ATTACKER = "127.0.0.2"
SECONDS = float(os.environ.get("DOOR_SECONDS", "20"))
HALF_OPEN = int(os.environ.get("DOOR_HALF_OPEN", "100"))
IDLE = int(os.environ.get("DOOR_IDLE", "20"))


class HalfOpenFlood:
    """*count* connections that each send the first 6 bytes of an A-ASSOCIATE-RQ and then
    nothing; every one the node closes is opened again at once."""

    def __init__(self, port: int, count: int) -> None:
        self.port, self.count = port, count
        self.opened = self.cut_off = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HalfOpenFlood:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _open(self, selector: selectors.BaseSelector) -> None:
        try:
            sock = socket.create_connection(
                ("127.0.0.1", self.port), timeout=2, source_address=(ATTACKER, 0)
            )
            sock.sendall(association_request()[:6])
        except OSError:
            time.sleep(0.05)
            return
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        self.opened += 1

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        try:
            while not self._stop.is_set():
                while len(selector.get_map()) < self.count and not self._stop.is_set():
                    self._open(selector)
                for key, _ in selector.select(0.2):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        data = sock.recv(4096)
                    except OSError:
                        data = b""
                    if not data or data[0] == 0x03:  # closed, or answered A-ASSOCIATE-RJ
                        selector.unregister(sock)
                        sock.close()
                        self.cut_off += 1
        finally:
            for key in list(selector.get_map().values()):
                with contextlib.suppress(OSError):
                    key.fileobj.close()  # type: ignore[union-attr]
            selector.close()


def idle_associations(port: int, count: int) -> list[object]:
    """Established associations from the attacker that then send nothing."""
    ae = AE(ae_title="IDLER")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    held = []
    for _ in range(count):
        assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE_NODE", bind_address=(ATTACKER, 0))
        if assoc.is_established:
            held.append(assoc)
    return held


def count(node: Node, sql: str) -> int:
    engine = create_engine(node.database_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(sql)).scalar_one())
    finally:
        engine.dispose()


@pytest.mark.slow
def test_a_flood_of_half_requests_and_idle_associations_does_not_lock_the_pacs_out(
    tmp_path: Path,
) -> None:
    require_tool("storescu", "dcmtk")
    try:
        socket.create_connection(("127.0.0.1", 9), source_address=(ATTACKER, 0), timeout=1)
    except ConnectionRefusedError:
        pass
    except OSError as exc:
        pytest.skip(f"no second loopback address {ATTACKER}: {exc}")
    model = write_model_dir(tmp_path / "model", size=64)
    node = Node(
        tmp_path / "node", dicom={"receivers": 2}, worker={"count": 1, "model_dir": str(model)}
    ).start()
    try:
        sent = 0
        with HalfOpenFlood(node.port, HALF_OPEN) as flood:
            held = idle_associations(node.port, IDLE)
            ends = time.monotonic() + SECONDS
            while time.monotonic() < ends:
                files = write_study_set(tmp_path / f"study{sent}", 4, 64, 64, per_study=4)
                result = storescu(node.port, files, timeout=60)
                assert result.returncode == 0, result.stdout + result.stderr
                assert "Rejected" not in result.stdout + result.stderr
                sent += 1
                time.sleep(2)
            for assoc in held:
                assoc.release()  # type: ignore[attr-defined]
        assert flood.cut_off > 0  # the node refused or closed the attacker's connections
        # every acknowledged instance is stored; the studies settle and are analysed
        assert count(node, "select count(*) from instances") == 4 * sent
        wait_for(
            lambda: count(node, "select count(*) from studies where state = 'INFERRED'") == sent,
            120,
            what="every study to be analysed",
        )
        refusals = [r for r in node.log_records() if r.get("action") == "connection_refused"]
        assert refusals and all(r.get("peer") == ATTACKER for r in refusals)
        wait_for(
            lambda: count(node, "select count(*) from associations where ended_at is null") == 0,
            30,
            what="no association slot held",
        )
    finally:
        assert node.stop() == 0
