"""What doing nothing costs: the node's CPU with no traffic, and with idle associations held
open, beside stock pynetdicom (``null_scp.py``, the same receiver set-up keeping nothing) holding
the same associations, in one run.

    python benchmarks/idle.py [--associations 100] [--seconds 20]

CPU is read from /proc (user + system time of the process and all its children), as a share of
one core over the window.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # noqa: E402
from tests.support.node import Node  # noqa: E402
from tests.support.peers import free_port, wait_for  # noqa: E402

from triage_node.config import DicomConfig, ServiceConfig  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> float:
    """User + system seconds of *root* and every process below it, now."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / TICKS
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += times.get(pid, 0.0)
        stack.extend(p for p, parent in parents.items() if parent == pid)
    return total


def core_share(root: int, seconds: float) -> float:
    before = tree_cpu_seconds(root)
    time.sleep(seconds)
    return (tree_cpu_seconds(root) - before) / seconds


def hold(port: int, called: str, count: int) -> list[object]:
    ae = AE(ae_title="IDLE_SCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 600
    held = []
    for _ in range(count):
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        if not assoc.is_established:
            raise SystemExit(f"association {len(held) + 1} to {called} was not accepted")
        held.append(assoc)
    return held


def release(held: list[object]) -> None:
    for assoc in held:
        assoc.release()  # type: ignore[attr-defined]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--associations", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    n, window = args.associations, args.seconds

    with tempfile.TemporaryDirectory() as tmp:
        node = Node(
            Path(tmp),
            dicom={
                "receivers": 1,
                "max_associations": n + 10,
                "reserved_networks": ["127.0.0.1/32"],
                "network_timeout": 600,
                "transport": DicomConfig().transport,  # the default, "auto"
            },
            service={  # the defaults, not the test harness's quick ones
                "poll_seconds": ServiceConfig().poll_seconds,
                "heartbeat_seconds": ServiceConfig().heartbeat_seconds,
            },
            log={"format": "json", "level": "INFO"},
        ).start()
        try:
            assert node.process is not None
            time.sleep(5)  # past start-up
            idle_node = core_share(node.process.pid, window)
            held = hold(node.port, "TRIAGE_NODE", n)
            time.sleep(2)
            node_held = core_share(node.process.pid, window)
            release(held)
        finally:
            node.stop()

    port = free_port()
    peer = subprocess.Popen(
        [sys.executable, str(REPO / "benchmarks" / "null_scp.py"), str(port)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        wait_for(lambda: _accepts(port), 30, what="the pynetdicom peer")
        idle_peer = core_share(peer.pid, window)
        held = hold(port, "NULL_SCP", n)
        time.sleep(2)
        peer_held = core_share(peer.pid, window)
        release(held)
    finally:
        peer.terminate()
        peer.wait(30)

    print(f"CPU as a share of one core, {window:.0f} s windows, {n} idle associations")
    print(f"  triage-node, no traffic:           {idle_node:7.2%}  (every process)")
    print(f"  triage-node, {n} idle associations: {node_held:7.2%}")
    print(f"  pynetdicom,  no traffic:           {idle_peer:7.2%}")
    print(f"  pynetdicom,  {n} idle associations: {peer_held:7.2%}")
    extra_node, extra_peer = node_held - idle_node, peer_held - idle_peer
    ratio = extra_node / extra_peer if extra_peer > 0 else float("nan")
    print(
        f"  cost of {n} idle associations: node {extra_node:.2%}, pynetdicom {extra_peer:.2%}"
        f"  (ratio node/pynetdicom {ratio:.2f})"
    )
    return 0


def _accepts(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
