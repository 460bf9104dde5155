"""Local doorbells (service/doorbell) and the cross-host announcer on SQLite (service/relay)."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import create_engine

from triage_node.db.notify import Notifier, parse
from triage_node.service.doorbell import JOBS, OUTBOX, Doorbell, origin, ring
from triage_node.service.relay import Announcer, Relay


def test_a_ring_wakes_the_listener_once_however_often_it_rang(tmp_path: Path) -> None:
    with Doorbell(tmp_path, JOBS) as doorbell:
        assert doorbell.path == tmp_path / JOBS / str(os.getpid())
        assert doorbell.wait(0) is False
        for _ in range(3):
            ring(tmp_path, JOBS)
        assert doorbell.wait(5) is True
        assert doorbell.wait(0) is False  # the three rings counted once
    assert not (tmp_path / JOBS / str(os.getpid())).exists()  # the marker goes with it


def test_a_ring_reaches_its_topic_only_and_never_fails(tmp_path: Path) -> None:
    ring(tmp_path / "nobody", JOBS)  # no listener, no folder: nothing happens
    with Doorbell(tmp_path, JOBS) as jobs, Doorbell(tmp_path, OUTBOX) as outbox:
        (tmp_path / JOBS / "999999999").touch()  # a marker whose process is gone
        ring(tmp_path, OUTBOX)
        assert outbox.wait(5) is True
        assert jobs.wait(0) is False
        ring(tmp_path, JOBS)
        assert jobs.wait(5) is True


def test_each_doorbell_folder_has_its_own_origin(tmp_path: Path) -> None:
    assert origin(tmp_path / "a") == origin(tmp_path / "a")
    assert origin(tmp_path / "a") != origin(tmp_path / "b")


def test_on_sqlite_the_announcer_rings_locally_and_the_relay_stays_idle(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    notifier = Notifier(engine)
    assert notifier.enabled is False
    announce = Announcer(tmp_path / "run", notifier)
    with Doorbell(tmp_path / "run", JOBS) as doorbell:
        announce(JOBS)
        assert doorbell.wait(5) is True
    relay = Relay(tmp_path / "run", notifier).start()
    relay.stop()
    assert relay.relayed == 0
    engine.dispose()


def test_a_payload_names_its_topic_and_origin() -> None:
    assert parse("jobs host/0123456789abcdef") == ("jobs", "host/0123456789abcdef")
    assert parse("garbage") == ("garbage", "")
