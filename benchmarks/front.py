"""The node's Python front before a native DICOM transport (ingest.py, "dcmtk+front").

What a receiver process would keep in Python if its associations were served by DCMTK: it
listens on the DICOM port, admits each connection with the node's own admission code
(``dicom.admission``: the per-address and total limits, the deadline for a complete
A-ASSOCIATE-RQ), and passes the admitted socket, with one end of a socket pair, to
``benchmarks/durable_scp.cpp --adopt`` (started here) over a Unix socket (SCM_RIGHTS). DCMTK
takes the association over from that socket and receives each instance into the spool's
incoming directory; for every instance it asks over the socket pair for the status to answer,
and the front stores the instance with the node's ``StorageHandlers`` (the same checks,
header read, fsync, placement and committed rows as the node's C-STORE handler) and answers
the status code. One thread per connection, as the node's receivers have, and with
``--processes`` as many receiver processes as the node has (each with its own DCMTK process),
accepting from one listening socket.

    python benchmarks/front.py DATABASE_URL SPOOL PORT DURABLE_SCP_BINARY [--header]
        [--processes N]

With ``--header`` DCMTK also reads each instance's header fields and sends them along, and the
front stores with those instead of parsing the file again (``Storer.store(header=...)``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import struct
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace

from recorder import FIELDS, receive_exactly
from triage_node.db.engine import make_engine, upgrade
from triage_node.db.intake import Intake
from triage_node.dicom.admission import Admission, AdmissionLimits, await_request
from triage_node.dicom.storage_scp import StorageHandlers
from triage_node.domain import InstanceHeader
from triage_node.errors import InvalidUID
from triage_node.spool import Spool


def serve_channel(channel: socket.socket, handlers: StorageHandlers) -> None:
    """Store each instance the native worker received; answer its status code."""
    while True:
        try:
            (length,) = struct.unpack("<I", receive_exactly(channel, 4))
            fields = receive_exactly(channel, length).decode(errors="replace").split("\0")[:-1]
            part, sop_class, sop_instance, *read = fields
        except (EOFError, OSError, ValueError):
            return  # the association ended (or the worker is broken: it gets no answer)
        request = SimpleNamespace(
            AffectedSOPClassUID=sop_class, AffectedSOPInstanceUID=sop_instance
        )
        header = None
        if len(read) == len(FIELDS):  # --adopt-header: DCMTK read them
            try:
                header = InstanceHeader(**dict(zip(FIELDS, read, strict=True)))
            except InvalidUID:
                header = None  # the node's own reading refuses it, with its status
        partial = Path(part)
        try:
            code, _ = handlers.store_as_requested(partial, request, None, header)
        finally:
            partial.unlink(missing_ok=True)  # nothing partial stays behind
        channel.sendall(struct.pack("<H", code))


def handle(
    connection: socket.socket,
    address: str,
    admission: Admission,
    control: socket.socket,
    control_lock: threading.Lock,
    handlers: StorageHandlers,
) -> None:
    try:
        if await_request(connection, admission.limits.request_timeout) is not None:
            connection.close()
            return
        ours, theirs = socket.socketpair()
        with control_lock:
            socket.send_fds(control, [b"A"], [connection.fileno(), theirs.fileno()])
        connection.close()
        theirs.close()
        with ours:
            serve_channel(ours, handlers)
    finally:
        admission.release(address)


def run_front(
    server: socket.socket, url: str, root: Path, binary: str, mode: str, index: int
) -> None:
    """One receiver process: its native worker process, its admission, its handlers."""
    spool = Spool(root)
    handlers = StorageHandlers(spool, Intake(make_engine(url)), min_free_bytes=0)
    control_path = root / f"control-{index}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(control_path))
        listener.listen(1)
        native = subprocess.Popen([binary, mode, str(control_path), str(spool.incoming_dir())])
        control, _ = listener.accept()
    control_lock = threading.Lock()
    admission = Admission(AdmissionLimits(per_address=64, total=64))
    try:
        while True:
            connection, (address, _) = server.accept()
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if admission.admit(address) is not None:
                connection.close()
                continue
            threading.Thread(
                target=handle,
                args=(connection, address, admission, control, control_lock, handlers),
                daemon=True,
            ).start()
    finally:
        with contextlib.suppress(OSError):
            control.close()
        native.terminate()
        native.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("spool", type=Path)
    parser.add_argument("port", type=int)
    parser.add_argument("binary")
    parser.add_argument("--header", action="store_true", help="DCMTK reads the header fields")
    parser.add_argument(
        "--processes", type=int, default=1, help="receiver processes (the node's default: 2)"
    )
    args = parser.parse_args()
    mode = "--adopt-header" if args.header else "--adopt"
    engine = make_engine(args.url)
    upgrade(engine)
    engine.dispose()
    Spool(args.spool).prepare()
    # Bound once and shared by every receiver process, as the node's service does.
    server = socket.create_server(("127.0.0.1", args.port), backlog=64)
    children = []
    for index in range(1, args.processes):
        pid = os.fork()
        if pid == 0:
            run_front(server, args.url, args.spool, args.binary, mode, index)
            os._exit(0)
        children.append(pid)

    def stop(*_: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    run_front(server, args.url, args.spool, args.binary, mode, 0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
