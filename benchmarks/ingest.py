"""Ingest benchmark: triage-node against Orthanc, DCMTK storescp, a keep-nothing pynetdicom
SCP and a durable DCMTK SCP, same files, same sender, one run.

Sends a set of large synthetic radiographs (about 2000x2500, 16-bit, ~10 MB) and a set of small
ones with DCMTK ``storescu`` to DCMTK ``storescp`` and to ``triage-node serve`` (durability on:
every instance fsynced and its row committed before Success), with one sender and with 4
parallel senders, and prints instances/s, MB/s and the ratio triage-node / storescp.

TCP_NODELAY=1 is set for the DCMTK tools (DCMTK leaves Nagle on otherwise, see
../shared/perf-notes.md); triage-node sets it on its own sockets. storescp writes without fsync
and uses --fork for the parallel runs; it runs with DCMTK's defaults (16 KiB PDU, as measured in
perf-notes.md) and again with a 128 KiB PDU like the node's. "pynetdicom-null" is a pynetdicom
SCP that keeps nothing (benchmarks/null_scp.py): the ceiling of any pynetdicom-based receiver.
"dcmtk-durable" (benchmarks/durable_scp.cpp, built here with g++ against Debian's libdcmtk-dev)
keeps the node's promise without Python -- file fsynced, renamed, its directory fsynced and
its rows committed to SQLite before Success: what a native receive path could reach.
"dcmtk+recorder" has the node's Python ``Intake`` record the rows (benchmarks/recorder.py).
"triage-node+dcmtk" is the node itself on its DCMTK transport (``dicom.transport = "dcmtk"``,
left out where it cannot be built).
Orthanc (Debian's package) runs with ``SyncStorageArea`` on, its default: the durable peer, the
one the node's targets are set against (at least 1.0x its instances/s and MB/s).

    .venv/bin/python benchmarks/ingest.py [--large 100] [--small 500] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.node import Node  # noqa: E402
from tests.support.orthanc import Orthanc  # noqa: E402
from tests.support.peers import (  # noqa: E402
    StoreSCP,
    dcmtk_env,
    free_port,
    require_tool,
    wait_for,
)
from tests.support.synth import write_study_set  # noqa: E402

from idle import tree_cpu_seconds  # noqa: E402
from triage_node.config import DicomConfig, ServiceConfig  # noqa: E402
from triage_node.dicom.native.build import ensure_program  # noqa: E402
from triage_node.errors import TriageError  # noqa: E402
from triage_node.service.supervisor import receiver_count  # noqa: E402

CACHE = REPO / "benchmarks" / ".cache"
PARALLEL = 4


@dataclass(frozen=True)
class Run:
    receiver: str
    dataset: str
    senders: int
    seconds: float
    instances: int
    megabytes: float

    @property
    def per_second(self) -> float:
        return self.instances / self.seconds

    @property
    def mb_per_second(self) -> float:
        return self.megabytes / self.seconds


def dataset(name: str, count: int, rows: int, columns: int) -> list[Path]:
    """Synthetic files, generated once and cached under benchmarks/.cache."""
    directory = CACHE / f"{name}-{count}-{rows}x{columns}"
    marker = directory / ".complete"
    if not marker.exists():
        shutil.rmtree(directory, ignore_errors=True)
        print(f"generating {count} {rows}x{columns} instances in {directory} ...", flush=True)
        write_study_set(directory, count, rows, columns, per_study=4)
        marker.touch()
    return sorted(directory.glob("*.dcm"))


def send(port: int, files: list[Path], senders: int, called: str) -> float:
    """Wall time for *senders* storescu processes to send *files* (split evenly)."""
    storescu = require_tool("storescu", "dcmtk")
    groups = [group for i in range(senders) if (group := files[i::senders])]  # none empty
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            [
                storescu,
                "-aec",
                called,
                "--max-pdu",
                "131072",
                "127.0.0.1",
                str(port),
                *map(str, group),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=dcmtk_env(),
            text=True,
        )
        for group in groups
    ]
    for process in processes:
        _, err = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"storescu failed: {err[-2000:]}")
    return time.perf_counter() - started


def measure_storescp(files: list[Path], senders: int, work: Path, pdu: bool = False) -> float:
    out = work / "storescp"
    args = (["--max-pdu", "131072"] if pdu else []) + (["--fork"] if senders > 1 else [])
    scp = StoreSCP(out, *args)
    try:
        return send(scp.port, files, senders, "STORESCP")
    finally:
        scp.stop()
        shutil.rmtree(out, ignore_errors=True)


def measure_storescp_128k(files: list[Path], senders: int, work: Path) -> float:
    return measure_storescp(files, senders, work, pdu=True)


def send_to_process(
    command: list[str], port: int, files: list[Path], senders: int, called: str, **popen: Any
) -> float:
    """``send`` to an SCP that *command* starts listening on *port*, stopped afterwards."""
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen
    )
    try:
        wait_for(lambda: port_open(port), 30, what=f"{called} to listen")
        return send(port, files, senders, called)
    finally:
        process.terminate()
        process.wait(10)


def measure_null_pynetdicom(files: list[Path], senders: int, work: Path) -> float:
    port = free_port()
    command = [sys.executable, str(REPO / "benchmarks" / "null_scp.py"), str(port)]
    return send_to_process(command, port, files, senders, "NULL_SCP")


DURABLE_SOURCE = REPO / "benchmarks" / "durable_scp.cpp"
DURABLE_LIBRARIES = ("-ldcmnet", "-ldcmdata", "-loflog", "-lofstd", "-lsqlite3", "-lpthread")


def durable_scp_binary() -> Path | None:
    """benchmarks/durable_scp.cpp compiled into the cache (again when the source changed);
    None, said once, where g++ or DCMTK's headers are missing."""
    binary = CACHE / "durable_scp"
    if binary.exists() and binary.stat().st_mtime >= DURABLE_SOURCE.stat().st_mtime:
        return binary
    compiler = shutil.which("g++")
    if compiler is None or not Path("/usr/include/dcmtk/dcmnet/scppool.h").exists():
        print(
            "dcmtk-durable and dcmtk+recorder left out: they need g++ and DCMTK's headers"
            " (apt-get install g++ libdcmtk-dev)",
            flush=True,
        )
        return None
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [compiler, "-O2", "-std=c++17", str(DURABLE_SOURCE), "-o", str(binary), *DURABLE_LIBRARIES],
        check=True,
    )
    return binary


def measure_durable_dcmtk(
    files: list[Path], senders: int, work: Path, recorder: bool = False
) -> float:
    """durable_scp.cpp; with *recorder* its rows go to the node's Python ``Intake`` through
    benchmarks/recorder.py instead of its own SQLite statements."""
    port, out = free_port(), work / "durable-scp"
    out.mkdir()
    binary = durable_scp_binary()
    assert binary is not None, "main() leaves the native peers out without a binary"
    command = [str(binary), str(port), str(out)]
    helper = None
    try:
        if recorder:
            sock = out / "recorder.sock"
            helper = subprocess.Popen(
                [
                    sys.executable,
                    str(REPO / "benchmarks" / "recorder.py"),
                    f"sqlite:///{out / 'node.sqlite'}",
                    str(sock),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            wait_for(sock.exists, 60, what="the recorder to listen")
            command.append(str(sock))
        # TCP_NODELAY, as for storescp
        return send_to_process(command, port, files, senders, "DURABLE_SCP", env=dcmtk_env())
    finally:
        if helper is not None:
            helper.terminate()
            helper.wait(10)
        shutil.rmtree(out, ignore_errors=True)


def measure_durable_recorder(files: list[Path], senders: int, work: Path) -> float:
    return measure_durable_dcmtk(files, senders, work, recorder=True)


def measure_orthanc(files: list[Path], senders: int, work: Path) -> float:
    orthanc = Orthanc(work / "orthanc", {}).start()
    try:
        return send(orthanc.dicom_port, files, senders, orthanc.ae_title)
    finally:
        orthanc.stop()
        shutil.rmtree(work / "orthanc", ignore_errors=True)


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def measure_triage_node(
    files: list[Path],
    senders: int,
    work: Path,
    source: Path | None = None,
    cpu: list[float] | None = None,
    transport: str = "pynetdicom",
) -> float:
    """Seconds for *files* into a fresh node (receive only) on *transport*; *source*: run the
    code in that ``src/`` directory instead of the installed one (ingest_ab.py); *cpu*: append
    the CPU seconds the node's processes used meanwhile."""
    defaults = ServiceConfig()
    node = Node(
        work / "triage-node",
        dicom={"receivers": 0, "transport": transport},
        log={"level": "INFO", "format": "json"},
        study={"settle_seconds": 2.0},
        # the service's own defaults, not the tests' quick sweep (every 0.1 s) and heartbeat
        service={
            "poll_seconds": defaults.poll_seconds,
            "heartbeat_seconds": defaults.heartbeat_seconds,
        },
    )
    if source is not None:
        node.env["PYTHONPATH"] = str(source)
    node.start()
    try:
        # Measured once it is ready, as Orthanc is: C-ECHO answers as soon as one receiver
        # listens, while the others are still starting (a second of CPU each, which would be
        # charged to the first files, and fewer receivers to share the senders).
        receivers = receiver_count(DicomConfig(receivers=0))  # as the node counts them
        wait_for(
            lambda: node.log().count('"receiver_started"') >= receivers,
            60,
            what=f"the node's {receivers} receivers to start",
        )
        assert node.process is not None
        used = tree_cpu_seconds(node.process.pid)
        seconds = send(node.port, files, senders, "TRIAGE_NODE")
        if cpu is not None:
            cpu.append(tree_cpu_seconds(node.process.pid) - used)
    finally:
        node.stop()
        shutil.rmtree(work / "triage-node", ignore_errors=True)
    return seconds


def measure_triage_node_dcmtk(files: list[Path], senders: int, work: Path) -> float:
    return measure_triage_node(files, senders, work, transport="dcmtk")


def dcmtk_transport_builds() -> bool:
    try:
        ensure_program(CACHE)
    except TriageError as exc:
        print(f"triage-node+dcmtk left out: {exc}")
        return False
    return True


RECEIVERS = (
    ("orthanc", measure_orthanc),
    ("storescp", measure_storescp),
    ("storescp-128k", measure_storescp_128k),
    ("pynetdicom-null", measure_null_pynetdicom),
    ("dcmtk-durable", measure_durable_dcmtk),
    ("dcmtk+recorder", measure_durable_recorder),
    ("triage-node", measure_triage_node),
    ("triage-node+dcmtk", measure_triage_node_dcmtk),
)
NATIVE = ("dcmtk-durable", "dcmtk+recorder")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", type=int, default=100, help="large instances (default 100)")
    parser.add_argument("--small", type=int, default=500, help="small instances (default 500)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell; median is shown")
    args = parser.parse_args()

    sets = {
        "large": dataset("large", args.large, 2000, 2500),
        "small": dataset("small", args.small, 512, 512),
    }
    receivers = RECEIVERS
    if durable_scp_binary() is None:
        receivers = tuple(r for r in receivers if r[0] not in NATIVE)
    if not dcmtk_transport_builds():
        receivers = tuple(r for r in receivers if r[0] != "triage-node+dcmtk")
    with tempfile.TemporaryDirectory(prefix="ingest-bench-", dir=CACHE) as tmp:
        runs = measure_matrix(sets, receivers, args.repeat, Path(tmp))
    report(runs, [name for name, _ in receivers])
    return 0


def settled(measure: Callable[..., float], *args: Any) -> float:
    """*measure* once the disk has written what earlier runs left in the page cache: storescp
    and the keep-nothing SCP write without fsync, and their hundreds of dirty megabytes,
    written back while the next receiver runs, would slow its every fsync (the node's runs
    came after theirs)."""
    os.sync()
    return measure(*args)


def measure_matrix(
    sets: dict[str, list[Path]],
    receivers: Sequence[tuple[str, Callable[..., float]]],
    repeat: int,
    work: Path,
    *extra: Any,
) -> list[Run]:
    """Each set, with 1 and PARALLEL senders, into each receiver *repeat* times (the median is
    kept): ``measure(files, senders, work, *extra)`` returns the seconds one run took."""
    runs: list[Run] = []
    for name, files in sets.items():
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        for senders in (1, PARALLEL):
            for receiver, measure in receivers:
                times = [settled(measure, files, senders, work, *extra) for _ in range(repeat)]
                run = Run(receiver, name, senders, statistics.median(times), len(files), megabytes)
                runs.append(run)
                print(
                    f"  {receiver:<12} {name:<6} senders={senders}  "
                    f"{run.per_second:8.1f} inst/s  {run.mb_per_second:8.1f} MB/s  "
                    f"(median of {repeat}: {', '.join(f'{t:.2f}' for t in times)} s)",
                    flush=True,
                )
    return runs


def report(runs: list[Run], receivers: list[str]) -> None:
    def get(receiver: str, name: str, senders: int) -> Run:
        return next(
            r for r in runs if (r.receiver, r.dataset, r.senders) == (receiver, name, senders)
        )

    print()
    header = f"{'set':<6} {'senders':>7}"
    for receiver in receivers:
        header += f" {receiver + ' inst/s':>22} {'MB/s':>7}"
    print(header + f" {'node/orthanc':>12}")
    for name in ("large", "small"):
        for senders in (1, PARALLEL):
            line = f"{name:<6} {senders:>7}"
            for receiver in receivers:
                run = get(receiver, name, senders)
                line += f" {run.per_second:>22.1f} {run.mb_per_second:>7.1f}"
            ratio = (
                get("triage-node", name, senders).per_second
                / get("orthanc", name, senders).per_second
            )
            print(f"{line} {ratio:>12.2f}")

    def ratio(receiver: str, peer: str, name: str) -> float:
        return get(receiver, name, 1).per_second / get(peer, name, 1).per_second

    parallel = min(
        get("triage-node", n, PARALLEL).per_second / get("triage-node", n, 1).per_second
        for n in ("large", "small")
    )
    print()
    for node_name in ("triage-node", "triage-node+dcmtk"):
        if node_name not in receivers:
            continue
        print(f"{node_name} / Orthanc (the durable peer; target 1.0 everywhere):")
        for name in ("large", "small"):
            for senders in (1, PARALLEL):
                node, orthanc = get(node_name, name, senders), get("orthanc", name, senders)
                print(
                    f"  {name:<6} senders={senders}  "
                    f"inst/s {node.per_second / orthanc.per_second:.2f}"
                    f"  MB/s {node.mb_per_second / orthanc.mb_per_second:.2f}"
                )
    print("ratios, one sender (storescp = DCMTK defaults, as in perf-notes.md):")
    for peer in ("storescp", "storescp-128k"):
        print(
            f"  vs {peer:<14} large MB/s {ratio('triage-node', peer, 'large'):.2f} (target 1.0)"
            f"   small inst/s {ratio('triage-node', peer, 'small'):.2f} (target 0.6)"
        )
        print(
            f"  pynetdicom-null vs {peer:<14} large {ratio('pynetdicom-null', peer, 'large'):.2f}"
            f"   small {ratio('pynetdicom-null', peer, 'small'):.2f}  (ceiling of any pynetdicom"
            " receiver)"
        )
    print(
        "native receivers keeping the node's promise / Orthanc (dcmtk-durable: rows by its own"
        " SQLite statements; dcmtk+recorder: by the node's Intake over a Unix socket):"
    )
    for native in (name for name in NATIVE if name in receivers):
        for name in ("large", "small"):
            print(
                f"  {native:<15} {name:<6} "
                + "  ".join(
                    f"senders={n} "
                    f"{get(native, name, n).per_second / get('orthanc', name, n).per_second:.2f}"
                    for n in (1, PARALLEL)
                )
            )
    print(f"triage-node {PARALLEL} senders / 1 sender (min over sets): {parallel:.2f} (target 1.0)")
    print(
        f"machine: {os.cpu_count()} cores; triage-node and Orthanc fsync every instance,"
        " storescp does not"
    )


if __name__ == "__main__":
    raise SystemExit(main())
