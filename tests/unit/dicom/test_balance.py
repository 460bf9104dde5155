"""Receivers sharing the DICOM port: the busier one lets the idler one accept first."""

from __future__ import annotations

import multiprocessing
import socket
import threading

import pytest

from triage_node.dicom import balance as balance_module
from triage_node.dicom.balance import LONGEST_DEFERRAL, AcceptBalance


def test_a_receiver_ahead_of_the_least_busy_waits_per_connection() -> None:
    counts = multiprocessing.get_context("spawn").RawArray("i", 2)
    first, second = AcceptBalance(counts, 0), AcceptBalance(counts, 1)
    assert first.deferral() == second.deferral() == 0
    first.opened()
    assert list(counts) == [1, 0]
    assert first.deferral() == pytest.approx(0.001) and second.deferral() == 0
    second.opened()
    assert first.deferral() == second.deferral() == 0  # as busy as each other: accept at once
    for _ in range(10):
        first.opened()
    assert first.deferral() == LONGEST_DEFERRAL  # a few milliseconds at most
    for _ in range(11):
        first.closed()
    first.closed()  # never below zero
    assert list(counts) == [0, 1]
    assert second.deferral() == pytest.approx(0.001)


def test_a_restarted_receiver_starts_from_nothing() -> None:
    counts = [5, 2]
    AcceptBalance(counts, 0)
    assert counts == [0, 2]


def test_a_receiver_alone_never_waits() -> None:
    alone = AcceptBalance.alone()
    for _ in range(3):
        alone.opened()
    assert alone.deferral() == 0


def test_threads_count_exactly() -> None:
    counts = [0, 0]
    balance = AcceptBalance(counts, 1)

    def churn() -> None:
        for _ in range(2000):
            balance.opened()
            balance.closed()

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counts == [0, 0]


def test_the_server_defers_accept_while_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """ReceiverServer.get_request sleeps the deferral, then accepts; a connection another
    receiver took meanwhile is BlockingIOError, which socketserver ignores."""
    from triage_node.dicom.server import ReceiverServer

    slept: list[float] = []
    monkeypatch.setattr(balance_module, "DEFERRAL_PER_CONNECTION", 0.001)
    monkeypatch.setattr("triage_node.dicom.server.time.sleep", slept.append)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    server = ReceiverServer.__new__(ReceiverServer)  # only what get_request uses
    server.socket = listener
    server._ssl_context = None  # TLS is wrapped per connection (dicom.server)
    server.balance = AcceptBalance([2, 0], 0)
    server.balance.opened()
    server.balance.opened()
    try:
        with pytest.raises(BlockingIOError):
            server.get_request()  # nobody connected (or another receiver took it)
        assert slept == [pytest.approx(0.002)]
        client = socket.create_connection(listener.getsockname())
        accepted = None
        for _ in range(100):
            try:
                accepted, _ = server.get_request()
                break
            except BlockingIOError:
                continue
        assert accepted is not None
        accepted.close()
        client.close()
    finally:
        listener.close()
