"""STOW-RS ingest benchmark: triage-node's receiver against Orthanc's own STOW-RS (its DICOMweb
plugin, ``SyncStorageArea`` on), same files, same client, one run.

The client (requests, one persistent connection per sender) posts ``multipart/related`` bodies
of ``--per-request`` instances each to ``/dicom-web/studies``; one sender and 4 in parallel, the
large set (about 2000x2500, 16-bit, ~10 MB) and the small one (512x512, ~0.5 MB). Both servers
fsync every instance before answering. Prints instances/s, MB/s and node / Orthanc.

    .venv/bin/python benchmarks/stow.py [--large 100] [--small 500] [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from tests.support.node import Node  # noqa: E402
from tests.support.orthanc import Orthanc  # noqa: E402
from tests.support.peers import free_port  # noqa: E402

from ingest import CACHE, PARALLEL, dataset, measure_matrix  # noqa: E402
from triage_node.credentials import hash_secret  # noqa: E402

TOKEN = "benchmark-token"  # noqa: S105 - a benchmark's local credential


def post_all(address: str, files: list[Path], senders: int, per_request: int, token: str) -> float:
    """Wall time for *senders* threads to STOW-RS *files* (split evenly) to *address*."""
    groups = [files[i::senders] for i in range(senders)]
    errors: list[str] = []

    def sender(group: list[Path]) -> None:
        with requests.Session() as session:
            if token:
                session.headers["Authorization"] = f"Bearer {token}"
            for start in range(0, len(group), per_request):
                boundary = uuid.uuid4().hex
                body = (
                    b"".join(
                        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                        + path.read_bytes()
                        + b"\r\n"
                        for path in group[start : start + per_request]
                    )
                    + f"--{boundary}--\r\n".encode()
                )
                content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
                answer = session.post(
                    address, data=body, headers={"Content-Type": content_type}, timeout=300
                )
                if answer.status_code != 200:
                    errors.append(f"{address}: HTTP {answer.status_code} {answer.text[:300]}")

    threads = [threading.Thread(target=sender, args=(g,)) for g in groups]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(errors[0])
    return time.perf_counter() - started


def measure_orthanc(files: list[Path], senders: int, work: Path, per_request: int) -> float:
    orthanc = Orthanc(work / "orthanc", {}, dicomweb_servers={}).start()
    try:
        return post_all(f"{orthanc.dicomweb_url}/studies", files, senders, per_request, "")
    finally:
        orthanc.stop()
        shutil.rmtree(work / "orthanc", ignore_errors=True)


def measure_triage_node(files: list[Path], senders: int, work: Path, per_request: int) -> float:
    port = free_port()
    node = Node(
        work / "triage-node",
        dicom={"receivers": 1},
        dicomweb={"port": port, "bind": "127.0.0.1", "tokens": [hash_secret(TOKEN)]},
        log={"level": "INFO", "format": "json"},
        study={"settle_seconds": 2.0},
    ).start()
    try:
        address = f"http://127.0.0.1:{port}/dicom-web/studies"
        post_all(address, files[:1], 1, 1, TOKEN)  # the first token check pays PBKDF2 once
        return post_all(address, files, senders, per_request, TOKEN)
    finally:
        node.stop()
        shutil.rmtree(work / "triage-node", ignore_errors=True)


RECEIVERS = (("orthanc", measure_orthanc), ("triage-node", measure_triage_node))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", type=int, default=100, help="large instances (default 100)")
    parser.add_argument("--small", type=int, default=500, help="small instances (default 500)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell; median is shown")
    parser.add_argument("--per-request", type=int, default=10, help="instances per request")
    args = parser.parse_args()
    sets = {
        "large": dataset("large", args.large, 2000, 2500),
        "small": dataset("small", args.small, 512, 512),
    }
    with tempfile.TemporaryDirectory(prefix="stow-bench-", dir=CACHE) as tmp:
        runs = measure_matrix(sets, RECEIVERS, args.repeat, Path(tmp), args.per_request)
    print("\ntriage-node / Orthanc, STOW-RS (both fsync every instance):")
    for name in sets:
        for senders in (1, PARALLEL):
            node, orthanc = (
                next(r for r in runs if (r.receiver, r.dataset, r.senders) == (k, name, senders))
                for k in ("triage-node", "orthanc")
            )
            print(
                f"  {name:<6} senders={senders}  inst/s {node.per_second / orthanc.per_second:.2f}"
                f"  MB/s {node.mb_per_second / orthanc.mb_per_second:.2f}"
            )
    print(f"{args.per_request} instances per request; machine: as measured, same run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
