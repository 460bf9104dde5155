"""Admission at accept time: slots per address and in all, reserved slots, the request
deadline that a trickle does not extend, and rejections that reach the peer."""

from __future__ import annotations

import ipaddress
import logging
import select
import socket
import struct
import threading
import time

import pytest

from tests.support.pdus import association_request
from triage_node.dicom.admission import (
    NO_REQUEST,
    Admission,
    AdmissionLimits,
    RefusalLog,
    Rejector,
    await_request,
    peer_gone,
)

PACS = ipaddress.ip_network("10.0.0.0/24")


def test_slots_per_address_and_in_all() -> None:
    admission = Admission(AdmissionLimits(per_address=2, total=3))
    assert admission.admit("10.1.1.1") is None
    assert admission.admit("10.1.1.1") is None
    assert "from this address" in (admission.admit("10.1.1.1") or "")
    assert admission.admit("10.1.1.2") is None
    assert "all 3" in (admission.admit("10.1.1.3") or "")
    admission.release("10.1.1.1")
    assert admission.admit("10.1.1.3") is None and admission.open == 3


def test_reserved_networks_always_get_in() -> None:
    admission = Admission(
        AdmissionLimits(per_address=4, total=6, reserved_networks=(PACS,), reserved=2)
    )
    for n in range(4):  # the others take what is not reserved, four addresses, one each
        assert admission.admit(f"192.168.0.{n}") is None
    assert "reserved" in (admission.admit("192.168.0.9") or "")
    assert admission.admit("10.0.0.5") is None  # the PACS: a reserved slot
    assert admission.admit("::ffff:10.0.0.5") is None  # the same, as IPv4-mapped IPv6
    assert "all 6" in (admission.admit("10.0.0.6") or "")
    for _ in range(2):
        admission.release("10.0.0.5")
    for n in range(5):  # the PACS is not held to the per-address limit
        assert admission.admit("10.0.0.5") is None or n >= 2


def pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    return client, server


def test_a_complete_request_is_let_through_at_once() -> None:
    client, server = pair()
    with client, server:
        client.sendall(association_request())
        started = time.monotonic()
        assert await_request(server, 60.0) is None
        assert time.monotonic() - started < 30  # not the deadline (no speed assumed)
        assert server.recv(1, socket.MSG_PEEK) == b"\x01"  # still there for pynetdicom


def test_nothing_sent_is_no_request() -> None:
    client, server = pair()
    with client, server:
        assert await_request(server, 0.3) == NO_REQUEST


def test_a_trickle_does_not_extend_the_deadline() -> None:
    client, server = pair()
    request = association_request()
    stop = threading.Event()

    def trickle() -> None:  # after the PDU header, a byte every 200 ms: about 20 s in all
        for byte in request[10:]:
            if stop.wait(0.2):
                return
            client.send(bytes([byte]))

    sender = threading.Thread(target=trickle)
    with client, server:
        client.sendall(request[:10])
        sender.start()
        started = time.monotonic()
        try:
            assert await_request(server, 0.5) == "incomplete association request"
            assert time.monotonic() - started < 10  # the trickle would have taken 20 s
        finally:
            stop.set()
            sender.join()


def test_a_peer_that_closes_half_way_is_not_waited_for() -> None:
    client, server = pair()
    with client, server:
        client.sendall(association_request()[:40])
        client.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        assert await_request(server, 60.0) == "incomplete association request"
        assert time.monotonic() - started < 30  # not the deadline (no speed assumed)


def test_a_peer_gone_before_asking_is_told_apart_from_one_still_there() -> None:
    """Closed or reset without a byte: gone. Still open, or closed after sending its request
    (which must still be answered): not gone."""
    client, server = pair()
    with server:
        client.close()
        assert select.select([server], [], [], 10)[0], "the close did not arrive"
        assert peer_gone(server)
    client, server = pair()
    with server:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # a reset
        assert select.select([server], [], [], 10)[0], "the reset did not arrive"
        assert peer_gone(server)
    client, server = pair()
    with client, server:
        assert not peer_gone(server)
        client.sendall(association_request())
        client.shutdown(socket.SHUT_WR)
        assert select.select([server], [], [], 10)[0], "the request did not arrive"
        assert not peer_gone(server)
        assert server.recv(1, socket.MSG_PEEK) == b"\x01"  # left for pynetdicom


def test_a_refused_peer_reads_a_transient_local_limit_rejection() -> None:
    rejector = Rejector()
    try:
        client, server = pair()
        with client:
            client.settimeout(5)
            client.sendall(association_request())
            rejector.reject(server)
            answer = client.recv(64)
        # A-ASSOCIATE-RJ: type 3, length 4, then reserved, result 2, source 3, reason 2
        assert answer == b"\x03\x00\x00\x00\x00\x04\x00\x02\x03\x02"
    finally:
        rejector.stop()


def test_a_flood_of_refusals_is_logged_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    log = RefusalLog(every=60)
    with caplog.at_level(logging.WARNING, logger="triage_node"):
        for _ in range(500):
            log.refused("8 connections from this address already", "192.0.2.7")
    lines = [r for r in caplog.records if getattr(r, "action", "") == "connection_refused"]
    assert len(lines) == 1 and lines[0].peer == "192.0.2.7"
