"""Idle associations sleep longer between their checks; busy ones poll as pynetdicom does."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pynetdicom.association
import pynetdicom.dul
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.support.peers import free_port
from triage_node.dicom.reactor import (
    IDLE_AFTER,
    IDLE_SLEEP,
    LONG_IDLE_AFTER,
    LONG_IDLE_SLEEP,
    POLL,
    polling_sleep,
    quiet_idle_associations,
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
