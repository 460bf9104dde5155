"""PDU reads: pynetdicom's own socket reader against the node's (``dicom.pdu_reads``).

A sender thread writes P-DATA-TF-sized PDUs (6-byte header and body, as the DUL reads them) over
loopback TCP; the reading thread reads header and body with each reader in turn, alternating
which goes first, and the CPU it used (``time.thread_time``) is reported per MB received —
the cost of receiving a C-STORE's bytes before anything else is done with them. The figure
is the reading thread's own CPU, so it moves less with the machine's load than a throughput
does.

    .venv/bin/python benchmarks/pdu_reads.py [--pdu 131072] [--megabytes 200] [--rounds 4]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from pynetdicom.transport import AssociationSocket  # noqa: E402

from triage_node.dicom.pdu_reads import receive_exactly  # noqa: E402

Reader = Callable[[socket.socket, int], bytearray]


def pynetdicom_reader(sock: socket.socket, nr_bytes: int) -> bytearray:
    return AssociationSocket.recv(SimpleNamespace(socket=sock), nr_bytes)  # type: ignore[arg-type]


READERS: dict[str, Reader] = {"pynetdicom": pynetdicom_reader, "triage-node": receive_exactly}


def cpu_per_megabyte(read: Reader, pdu_length: int, count: int) -> float:
    """Milliseconds of the reading thread's CPU per MB for *count* PDUs of *pdu_length*."""
    server = socket.create_server(("127.0.0.1", 0))
    sender = socket.create_connection(server.getsockname())
    receiver, _ = server.accept()
    server.close()
    pdu = struct.pack(">BBL", 0x04, 0, pdu_length) + bytes(pdu_length)

    def send() -> None:
        for _ in range(count):
            sender.sendall(pdu)

    thread = threading.Thread(target=send)
    started = time.thread_time()
    thread.start()
    for _ in range(count):
        header = read(receiver, 6)
        _, _, length = struct.unpack(">BBL", header)
        if len(read(receiver, length)) != length:
            raise RuntimeError("short read")
    used = time.thread_time() - started
    thread.join()
    sender.close()
    receiver.close()
    return 1000 * used / (count * len(pdu) / 1e6)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pdu", type=int, default=131072, help="PDU body length (bytes)")
    parser.add_argument("--megabytes", type=int, default=200, help="received per measurement")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    count = max(1, args.megabytes * 10**6 // args.pdu)
    figures: dict[str, list[float]] = {name: [] for name in READERS}
    for round_ in range(args.rounds):
        names = list(READERS) if round_ % 2 == 0 else list(reversed(READERS))
        for name in names:
            figures[name].append(cpu_per_megabyte(READERS[name], args.pdu, count))
    print(f"{count} PDUs of {args.pdu} bytes per measurement, {args.rounds} rounds")
    for name, values in figures.items():
        print(
            f"  {name:<12} CPU {statistics.median(values):.3f} ms per MB received"
            f" (each: {' '.join(f'{v:.3f}' for v in values)})"
        )
    ratio = statistics.median(figures["triage-node"]) / statistics.median(figures["pynetdicom"])
    print(f"  triage-node / pynetdicom: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
