"""PDUs read from the socket as they arrive: what pynetdicom's own reader gives, in fewer calls."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pynetdicom.transport
import pytest
from pydicom import dcmread
from pynetdicom import AE, evt

import triage_node.dicom.pdu_reads as pdu_reads
from tests.support.peers import free_port
from tests.support.synth import write_study_set
from triage_node.dicom.pdu_reads import read_pdus_whole, receive_exactly

ORIGINAL_RECV = pynetdicom.transport.AssociationSocket.recv


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    reader, writer = socket.socketpair()
    yield reader, writer
    reader.close()
    writer.close()


def send_in_pieces(
    writer: socket.socket, data: bytes, piece: int, then_close: bool
) -> threading.Thread:
    def run() -> None:
        for start in range(0, len(data), piece):
            writer.sendall(data[start : start + piece])
            time.sleep(0.001)
        if then_close:
            writer.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_bytes_that_arrive_in_pieces_are_read_whole(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, writer = pair
    data = os.urandom(300_000)
    sender = send_in_pieces(writer, data + b"next PDU", 7_001, then_close=False)
    received = receive_exactly(reader, len(data))
    sender.join()
    assert isinstance(received, bytearray)
    assert received == data
    assert receive_exactly(reader, 8) == b"next PDU"  # nothing beyond the length was taken


def test_a_connection_closed_early_gives_what_arrived(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, writer = pair
    send_in_pieces(writer, b"x" * 1000, 100, then_close=True).join()
    assert receive_exactly(reader, 5000) == b"x" * 1000  # pynetdicom then reports Evt17
    assert receive_exactly(reader, 6) == b""


def test_the_buffer_grows_only_as_data_arrive(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A header may claim 4 GiB; what is allocated follows what has arrived."""
    monkeypatch.setattr(pdu_reads, "FIRST_BUFFER", 1024)
    reader, writer = pair
    data = os.urandom(50_000)
    send_in_pieces(writer, data, 3_000, then_close=True).join()
    received = receive_exactly(reader, 2**32 - 1)  # a claim far beyond what comes
    assert received == data
    empty = receive_exactly(reader, 2**32 - 1)
    assert empty == b""


def test_nothing_asked_nothing_read(pair: tuple[socket.socket, socket.socket]) -> None:
    reader, writer = pair
    writer.sendall(b"abc")
    assert receive_exactly(reader, 0) == b""
    assert receive_exactly(reader, 3) == b"abc"


def test_a_socket_timeout_is_raised_as_pynetdicom_expects(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, writer = pair
    reader.settimeout(0.05)
    writer.sendall(b"ab")
    with pytest.raises(TimeoutError):
        receive_exactly(reader, 10)


@pytest.fixture
def reading_whole() -> Iterator[None]:
    read_pdus_whole()
    try:
        yield
    finally:
        pynetdicom.transport.AssociationSocket.recv = ORIGINAL_RECV  # type: ignore[method-assign]


def test_a_c_store_through_pynetdicom_reads_with_it(reading_whole: None, tmp_path: Path) -> None:
    """A real association (both ends in this process use the installed reader): the dataset
    the SCP receives is the one sent, over PDUs larger than one read."""
    assert pynetdicom.transport.AssociationSocket.recv is not ORIGINAL_RECV
    [path] = write_study_set(tmp_path / "set", 1, 512, 512, per_study=1)
    sent = dcmread(path)
    received: list[bytes] = []

    def on_store(event: evt.Event) -> int:
        received.append(bytes(event.dataset.PixelData))
        return 0x0000

    scp = AE(ae_title="SCP")
    scp.maximum_pdu_size = 0  # unlimited, as the node offers: the SCU sends large PDUs
    scp.add_supported_context(sent.SOPClassUID, sent.file_meta.TransferSyntaxUID)
    port = free_port()
    server = scp.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    scu = AE(ae_title="SCU")
    scu.add_requested_context(sent.SOPClassUID, sent.file_meta.TransferSyntaxUID)
    try:
        assoc = scu.associate("127.0.0.1", port, ae_title="SCP", max_pdu=0)
        assert assoc.is_established
        assert assoc.send_c_store(sent).Status == 0x0000
        assoc.release()
    finally:
        server.shutdown()
    assert received == [bytes(sent.PixelData)]
