"""The ceiling of any pynetdicom receiver: a Storage SCP that keeps nothing.

Same set-up as triage-node's receiver (chunked receive, unlimited PDU, TCP_NODELAY, every storage
SOP class and transfer syntax) but the handler answers Success at once and the streamed file is
thrown away. Used by ingest.py to show how much of the gap to storescp is pynetdicom itself.

    python benchmarks/null_scp.py PORT
"""

from __future__ import annotations

import socket
import sys
import tempfile
from typing import Any

from pynetdicom import AE, _config, evt

from triage_node.dicom.storage_scp import supported_contexts


def on_open(event: Any) -> None:
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def main() -> int:
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.LOG_HANDLER_LEVEL = "none"
    tempfile.tempdir = tempfile.mkdtemp(prefix="null-scp-")
    ae = AE(ae_title="NULL_SCP")
    ae.maximum_pdu_size = 0
    ae.maximum_associations = 1000  # as many as a benchmark holds open
    ae.supported_contexts = supported_contexts()
    handlers = [(evt.EVT_C_STORE, lambda event: 0x0000), (evt.EVT_CONN_OPEN, on_open)]
    ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=handlers, block=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
