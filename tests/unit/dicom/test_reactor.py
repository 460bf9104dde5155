"""Reactor threads with doorbells wait for work; those without sleep longer while idle."""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Iterator
from typing import Any

import pynetdicom.association
import pynetdicom.dul
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler

from tests.support.peers import free_port
from triage_node.dicom.reactor import (
    IDLE_AFTER,
    IDLE_SLEEP,
    LONG_IDLE_AFTER,
    LONG_IDLE_SLEEP,
    POLL,
    Doorbell,
    RingingQueue,
    close_doorbells,
    polling_sleep,
    quiet_idle_associations,
    ring_on_traffic,
    wait_for_work,
)


@pytest.fixture
def quiet() -> Iterator[None]:
    saved = pynetdicom.association.time, pynetdicom.dul.time  # type: ignore[attr-defined]
    quiet_idle_associations()
    try:
        yield
    finally:
        pynetdicom.association.time, pynetdicom.dul.time = saved  # type: ignore[attr-defined]


def test_other_threads_and_longer_sleeps_are_left_alone() -> None:
    assert polling_sleep(threading.current_thread(), POLL) == POLL
    assert polling_sleep(threading.current_thread(), 0.5) == 0.5


def test_an_idle_association_sleeps_longer_until_it_hears_again(quiet: None) -> None:
    scp = AE(ae_title="SCP")
    scp.add_supported_context(Verification)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False)
    scu = AE(ae_title="SCU")
    scu.add_requested_context(Verification)
    assoc = scu.associate("127.0.0.1", port, ae_title="SCP")
    try:
        assert assoc.is_established
        [served] = server.active_associations
        time.sleep(IDLE_AFTER + 0.3)
        assert polling_sleep(served, POLL) == IDLE_SLEEP
        assert polling_sleep(served.dul, POLL) == IDLE_SLEEP
        served.dul._idle_timer._start_time -= LONG_IDLE_AFTER  # as if quiet for long
        assert polling_sleep(served, POLL) == LONG_IDLE_SLEEP
        assert assoc.send_c_echo().Status == 0x0000  # answered though it was quiet
        assert polling_sleep(served, POLL) == POLL  # busy again: pynetdicom's own polling
    finally:
        assoc.release()
        server.shutdown()


# -- doorbells: both reactor threads wait for work instead of polling ---------------------------


def test_a_doorbell_wakes_a_select_when_another_thread_rings() -> None:
    owner = threading.Thread(target=lambda: None)
    bell = Doorbell(owner=owner)
    try:
        assert select.select([bell], [], [], 0)[0] == []
        ringer = threading.Thread(target=bell.ring)
        ringer.start()
        ringer.join()
        assert select.select([bell], [], [], 0)[0] == [bell]
        bell.ring()  # from this (non-owner) thread too; rings pile up as bytes
        bell.drain()
        assert select.select([bell], [], [], 0)[0] == []
    finally:
        bell.close()


def test_the_owner_ringing_itself_sends_nothing() -> None:
    bell = Doorbell(owner=threading.current_thread())
    try:
        bell.ring()
        assert select.select([bell], [], [], 0)[0] == []
    finally:
        bell.close()


def test_a_ringing_queue_rings_after_the_item_is_on_it() -> None:
    seen: list[int] = []
    q: RingingQueue = RingingQueue(lambda: seen.append(q.qsize()))
    q.put("a")
    q.put("b")
    assert seen == [1, 2]  # each ring found its item already there
    assert [q.get_nowait(), q.get_nowait()] == ["a", "b"]


def test_an_acceptor_with_doorbells_keeps_what_its_queues_held_and_waits_on_them(
    quiet: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    scp = AE(ae_title="SCP")
    scp.add_supported_context(Verification)
    port = free_port()
    created: list[Any] = []
    original = RequestHandler._create_association

    def create(handler: RequestHandler) -> Any:
        assoc = original(handler)  # its socket already queued "connection indication"
        ring_on_traffic(assoc)
        created.append(assoc)
        return assoc

    monkeypatch.setattr(RequestHandler, "_create_association", create)
    server = scp.start_server(("127.0.0.1", port), block=False)
    scu = AE(ae_title="SCU")
    scu.add_requested_context(Verification)
    assoc = scu.associate("127.0.0.1", port, ae_title="SCP")  # Evt5 was carried across
    try:
        assert assoc.is_established
        [served] = created
        assert isinstance(served.dimse.msg_queue, RingingQueue)
        assert isinstance(served.dul.event_queue, RingingQueue)
        for _ in range(20):  # answered every time: a response wakes the DUL to send it
            assert assoc.send_c_echo().Status == 0x0000
        assert wait_for_work(served, POLL)  # the association thread waits on its bell
        assert wait_for_work(served.dul, POLL)  # the DUL thread on its socket and bell
        assert not wait_for_work(served, 0.5)  # a longer sleep stays a sleep
    finally:
        assoc.release()
        server.shutdown()
    close_doorbells(created[0])


def test_threads_without_doorbells_sleep_as_before(quiet: None) -> None:
    assert not wait_for_work(threading.current_thread(), POLL)
