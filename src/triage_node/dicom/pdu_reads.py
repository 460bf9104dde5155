"""Reading a PDU off the socket in as few system calls as the data allow.

pynetdicom 3 reads every PDU in pieces of at most 4 KiB (``AssociationSocket.recv``: a
``recv(4096)`` and a ``bytearray.extend`` per piece), so a 128 KiB P-DATA-TF PDU costs 32 system
calls and as many copies in Python, and a 10 MB radiograph some 2,500 of each. Here the bytes
are received straight into the buffer that is returned (``socket.recv_into``), as much at a
time as the kernel holds: one call per arrival instead of one per 4 KiB.

What is returned and raised is what pynetdicom's own method returns and raises — a bytearray of
*nr_bytes*, or of fewer when the peer closed the connection; a socket error or timeout
propagates — so its callers (the DUL's PDU reader) are unchanged. The buffer never runs far
ahead of the data: a PDU length in a header is only a claim of the peer's (up to 4 GiB), so the
buffer starts at :data:`FIRST_BUFFER` at most — a P-DATA-TF PDU from DCMTK (16 or 128 KiB) fits
at once, while six bytes on each of the 64 association slots of a node on its defaults claim
16 MiB in all — and doubles only as that much has arrived.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any, cast

import pynetdicom.transport
from pynetdicom.transport import AssociationSocket

FIRST_BUFFER = 1 << 18  # bytes allocated before any of a PDU has arrived (256 KiB)


def receive_exactly(sock: socket.socket | ssl.SSLSocket, nr_bytes: int) -> bytearray:
    """*nr_bytes* from *sock*, fewer when the connection ends first (blocking, as the socket's
    timeout says)."""
    buffer = bytearray(min(nr_bytes, FIRST_BUFFER))
    read = 0
    while read < nr_bytes:
        if read == len(buffer):  # as much as allocated has arrived: make room for more
            buffer += bytes(min(len(buffer), nr_bytes - read))
        with memoryview(buffer) as view:
            count = sock.recv_into(view[read:])
        if not count:  # the peer closed the connection
            del buffer[read:]
            return buffer
        read += count
    return buffer


def _recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    return receive_exactly(cast(Any, self.socket), nr_bytes)


_recv.__doc__ = AssociationSocket.recv.__doc__


def read_pdus_whole() -> None:
    """Make this process's pynetdicom read PDUs with :func:`receive_exactly` (receiver
    processes call it once)."""
    pynetdicom.transport.AssociationSocket.recv = _recv  # type: ignore[method-assign]
