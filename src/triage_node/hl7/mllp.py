"""MLLP, the framing HL7 v2 messages travel in over TCP (HL7 v2.5.1 Appendix C.4):
``<VT> message <FS><CR>``. A threaded listener that hands each message to a callable and
writes back the acknowledgement it returns, and a client that sends one message and waits for
its ACK.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from collections.abc import Callable, Sequence

from triage_node.errors import TriageError
from triage_node.logs import get_logger, log_event
from triage_node.networks import AllowedNetworks

LOG = get_logger(__name__)

START = b"\x0b"
END = b"\x1c\x0d"
MAX_MESSAGE_BYTES = 1 << 20  # an ORU with an embedded PDF is larger; those are refused
IDLE_TIMEOUT_SECONDS = 120.0

Handler = Callable[[bytes], bytes]  # message bytes -> acknowledgement bytes


class MLLPError(TriageError):
    """The MLLP peer broke the framing or could not be reached."""


def frame(message: bytes) -> bytes:
    return START + message + END


class FrameReader:
    """Reads framed messages from a socket, one at a time."""

    def __init__(self, sock: socket.socket, limit: int = MAX_MESSAGE_BYTES) -> None:
        self.sock = sock
        self.limit = limit
        self.buffer = b""

    def read(self) -> bytes | None:
        """The next message, or None when the peer closed the connection between messages."""
        while True:
            start = self.buffer.find(START)
            if start > 0 and self.buffer[:start].strip():
                raise MLLPError("bytes outside an MLLP frame")
            if start >= 0:
                end = self.buffer.find(END, start)
                if end >= 0:
                    message = self.buffer[start + 1 : end]
                    self.buffer = self.buffer[end + len(END) :]
                    return message
            elif self.buffer.strip():
                raise MLLPError("data does not start with an MLLP start block (0x0B)")
            if len(self.buffer) > self.limit:
                raise MLLPError(f"message larger than {self.limit} bytes")
            chunk = self.sock.recv(65536)
            if not chunk:
                if self.buffer.strip():
                    raise MLLPError("connection closed inside a message")
                return None
            self.buffer += chunk


class _Connection(socketserver.BaseRequestHandler):
    server: MLLPServer

    def handle(self) -> None:
        peer = self.client_address[0]
        if not self.server.allowed(peer):
            log_event(LOG, logging.WARNING, "hl7_refused", "address not allowed", peer=peer)
            return
        self.request.settimeout(IDLE_TIMEOUT_SECONDS)
        reader = FrameReader(self.request)
        try:
            while (message := reader.read()) is not None:
                self.request.sendall(frame(self.server.on_message(message)))
        except MLLPError as exc:
            log_event(LOG, logging.WARNING, "hl7_framing", "connection dropped", error=str(exc))
        except OSError as exc:  # timeout or reset: the peer reconnects
            log_event(LOG, logging.INFO, "hl7_closed", "connection ended", error=str(exc))


class MLLPServer(socketserver.ThreadingTCPServer):
    """HL7 v2 over MLLP: one thread per connection, messages answered in order."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        on_message: Handler,
        allowed_networks: Sequence[str] = (),
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.on_message = on_message
        self.networks = AllowedNetworks(allowed_networks)
        super().__init__(address, _Connection)

    def allowed(self, peer: str) -> bool:
        return self.networks.allows(peer)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> threading.Thread:
        thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.5}, name="hl7", daemon=True
        )
        thread.start()
        return thread

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def send(host: str, port: int, message: bytes, timeout: float) -> bytes:
    """Send one message and return the acknowledgement's bytes; :class:`MLLPError` if none came."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(frame(message))
            answer = FrameReader(sock).read()
    except OSError as exc:
        raise MLLPError(f"{host}:{port}: {exc.strerror or exc}") from None
    if answer is None:
        raise MLLPError(f"{host}:{port} closed the connection without an acknowledgement")
    return answer
