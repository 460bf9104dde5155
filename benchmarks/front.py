"""The node's Python side of a receiver whose DICOM transport is DCMTK (ingest.py, "dcmtk+front").

What a receiver process would keep in Python if its associations were served by DCMTK: it
listens on the DICOM port, admits each connection with the node's own admission code
(``dicom.admission``: the per-address and total limits, the deadline for a complete
A-ASSOCIATE-RQ), and passes the admitted socket, with one end of a socket pair, to
``benchmarks/durable_scp.cpp --adopt`` (started here) over a Unix socket (SCM_RIGHTS). DCMTK
takes the association over from that socket; over the pair, the front decides on it with the
node's AE title rules (``dicom.ae_title``, ``require_called_ae``, ``allowed_calling_aes``),
records it and its end with the node's ``StorageHandlers`` (association rows, the settle
doorbell), and stores each instance DCMTK received into the spool's incoming directory with
the same handlers (the checks, header read, fsync, placement and committed rows of the node's
C-STORE handler), answering the status code. One thread per connection, as the node's
receivers have, and with ``--processes`` as many receiver processes as the node has (each with
its own DCMTK process), accepting from one listening socket.

    python benchmarks/front.py DATABASE_URL SPOOL PORT DURABLE_SCP_BINARY [--header]
        [--processes N] [--ae-title TITLE] [--allowed-calling TITLE ...]
        [--network-timeout SECONDS]

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
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from recorder import FIELDS, receive_exactly
from triage_node.config import DicomConfig
from triage_node.db.engine import make_engine, upgrade
from triage_node.db.intake import Intake
from triage_node.dicom.admission import Admission, await_request
from triage_node.dicom.server import admission_limits
from triage_node.dicom.storage_scp import StorageHandlers
from triage_node.domain import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    AssociationEnd,
    InstanceHeader,
)
from triage_node.errors import InvalidUID
from triage_node.spool import Spool


def verdict(config: DicomConfig, calling_ae: str, called_ae: str) -> int:
    """The node's AE title rules, as its pynetdicom AE applies them: 0 accept, 1 called AE
    title not recognised, 2 calling AE title not recognised."""
    if config.require_called_ae and called_ae.strip() != config.ae_title:
        return 1
    if config.allowed_calling_aes and calling_ae.strip() not in config.allowed_calling_aes:
        return 2
    return 0


def serve_channel(
    channel: socket.socket, handlers: StorageHandlers, config: DicomConfig, peer: str
) -> None:
    """Answer one association's worker (the protocol is in durable_scp.cpp's AdoptedSCP):
    decide on it, record it, store each instance it received, record its end."""
    calling_ae = ""
    try:
        while True:
            try:
                (length,) = struct.unpack("<I", receive_exactly(channel, 4))
                message = receive_exactly(channel, length)
                kind, fields = message[:1], message[1:].decode(errors="replace").split("\0")[:-1]
            except (EOFError, OSError, ValueError):
                return  # the worker ended
            if kind == b"Q":
                calling_ae, called_ae, _ = fields
                channel.sendall(bytes([verdict(config, calling_ae, called_ae)]))
            elif kind == b"O":
                handlers.opened(channel, calling_ae.strip(), config.ae_title, peer)
            elif kind == b"S":
                part, sop_class, sop_instance, *read = fields
                request = SimpleNamespace(
                    AffectedSOPClassUID=sop_class, AffectedSOPInstanceUID=sop_instance
                )
                header = None
                if len(read) == len(FIELDS):  # --adopt-header: DCMTK read them
                    try:
                        header = InstanceHeader(**dict(zip(FIELDS, read, strict=True)))
                    except InvalidUID:
                        header = None  # the node's own reading refuses it, with its status
                code, _ = handlers.stored(channel, Path(part), request, calling_ae, header)
                channel.sendall(struct.pack("<H", code))
            elif kind == b"E":
                handlers.ended(channel, AssociationEnd(fields[0]))
    finally:
        handlers.ended(channel, AssociationEnd.ABORTED)  # no-op once recorded


@dataclass(frozen=True)
class Front:
    """One receiver process's side of the hand-over."""

    control: socket.socket  # to its DCMTK process
    control_lock: threading.Lock
    admission: Admission
    handlers: StorageHandlers
    config: DicomConfig

    def handle(self, connection: socket.socket, address: str) -> None:
        """Wait for the complete A-ASSOCIATE-RQ (the node's deadline), hand the connection
        over, then answer its worker until the association ends; the slot is freed then."""
        try:
            if await_request(connection, self.admission.limits.request_timeout) is not None:
                connection.close()
                return
            ours, theirs = socket.socketpair()
            with self.control_lock:
                socket.send_fds(self.control, [b"A"], [connection.fileno(), theirs.fileno()])
            connection.close()
            theirs.close()
            with ours:
                serve_channel(ours, self.handlers, self.config, address)
        finally:
            self.admission.release(address)


def run_front(
    server: socket.socket, url: str, root: Path, config: DicomConfig, command: list[str], index: int
) -> None:
    """One receiver process: its DCMTK process, its admission, its handlers."""
    spool = Spool(root)
    control_path = root / f"control-{index}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(control_path))
        listener.listen(1)
        native = subprocess.Popen(
            [command[0], command[1], str(control_path), str(spool.incoming_dir()), *command[2:]]
        )
        control, _ = listener.accept()
    front = Front(
        control,
        threading.Lock(),
        Admission(admission_limits(config)),
        StorageHandlers(spool, Intake(make_engine(url)), min_free_bytes=0),
        config,
    )
    try:
        while True:
            connection, (address, _) = server.accept()
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if front.admission.admit(address) is not None:
                connection.close()
                continue
            threading.Thread(target=front.handle, args=(connection, address), daemon=True).start()
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
    parser.add_argument("--ae-title", default="TRIAGE_NODE")
    parser.add_argument("--allowed-calling", nargs="*", default=[], help="calling AE titles")
    parser.add_argument("--network-timeout", type=float, default=DicomConfig().network_timeout)
    args = parser.parse_args()
    config = DicomConfig(
        ae_title=args.ae_title,
        allowed_calling_aes=args.allowed_calling,
        network_timeout=args.network_timeout,
    )
    command = [
        args.binary,
        "--adopt-header" if args.header else "--adopt",
        config.ae_title,
        IMPLEMENTATION_CLASS_UID,
        IMPLEMENTATION_VERSION_NAME,
        str(round(config.network_timeout)),
    ]
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
            run_front(server, args.url, args.spool, config, command, index)
            os._exit(0)
        children.append(pid)

    def stop(*_: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    run_front(server, args.url, args.spool, config, command, 0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
