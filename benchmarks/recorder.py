"""The node's own database code behind a native receive path (ingest.py, "dcmtk+recorder").

Listens on a Unix socket for benchmarks/durable_scp.cpp's workers: each message is an
instance's header fields and spool path (NUL-separated after a 4-byte length), already fsynced
and placed; it is recorded with ``Intake.record_instance`` -- the same statements and commit as
the node's C-STORE handler, on a database made by the node's migrations -- and answered with one
byte (0 = committed). One thread per connection, as the workers are one per association.

    python benchmarks/recorder.py DATABASE_URL SOCKET
"""

from __future__ import annotations

import socket
import socketserver
import struct
import sys
from pathlib import Path

from triage_node.db.engine import make_engine, upgrade
from triage_node.db.intake import Intake
from triage_node.dicom.native.handover import HEADER_FIELDS, receive_exactly
from triage_node.domain import InstanceHeader, SpooledFile, utcnow

FIELDS = HEADER_FIELDS  # the InstanceHeader's, in its order


def serve(intake: Intake, path: Path) -> None:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            connection: socket.socket = self.request
            while True:
                try:
                    (length,) = struct.unpack("<I", receive_exactly(connection, 4))
                    fields = receive_exactly(connection, length).decode().split("\0")[:-1]
                except (EOFError, OSError):
                    return
                header = InstanceHeader(**dict(zip(FIELDS, fields[: len(FIELDS)], strict=True)))
                spooled = SpooledFile(relpath=fields[-2], size=int(fields[-1]), replaced=False)
                try:
                    intake.record_instance(header, spooled, None, utcnow())
                    connection.sendall(b"\0")
                except Exception:  # any failure: the worker answers with a failure status
                    connection.sendall(b"\1")

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    with Server(str(path), Handler) as server:
        server.serve_forever()


def main() -> int:
    url, path = sys.argv[1], Path(sys.argv[2])
    engine = make_engine(url)
    upgrade(engine)
    serve(Intake(engine), path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
