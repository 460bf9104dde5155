"""Cross-host wake-ups on a real PostgreSQL server: NOTIFY from one origin rings the doorbells
of every other origin's relay, and not its own (db/notify, service/relay)."""

from __future__ import annotations

import time
from pathlib import Path

from triage_node.db.engine import make_engine
from triage_node.db.notify import Notifier
from triage_node.service.doorbell import JOBS, OUTBOX, STUDIES, Doorbell
from triage_node.service.relay import Announcer, Relay


def test_a_notify_reaches_a_listening_connection(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    notifier = Notifier(engine)
    assert notifier.enabled is True
    try:
        with notifier.listen() as listening:
            assert listening.received(0.05) == []
            notifier.notify(JOBS, "host-a/1")
            notifier.notify(OUTBOX, "host-a/1")
            got: list[str] = []
            for _ in range(20):
                got += listening.received(0.5)
                if len(got) == 2:
                    break
            assert got == ["jobs host-a/1", "outbox host-a/1"]
    finally:
        engine.dispose()


def test_the_relay_rings_what_other_hosts_announce(postgres_url: str, tmp_path: Path) -> None:
    engine = make_engine(postgres_url)
    here, there = tmp_path / "here" / "run", tmp_path / "there" / "run"
    relay = Relay(here, Notifier(engine)).start()
    try:
        with Doorbell(here, JOBS) as jobs, Doorbell(here, STUDIES) as studies:
            # The relay is listening once a wake-up it is sent gets through.
            elsewhere = Announcer(there, Notifier(engine))
            for _ in range(40):
                elsewhere(JOBS)
                if jobs.wait(0.5):
                    break
            else:
                raise AssertionError("the relay rang nothing for a NOTIFY from another host")
            time.sleep(1.0)  # a NOTIFY sent by a later try of the loop arrives too
            jobs.wait(0)
            before = relay.relayed
            Announcer(here, Notifier(engine))(JOBS)  # its own host: rung locally, not relayed
            assert jobs.wait(5) is True
            elsewhere(STUDIES)  # a topic of one host only: not sent, not relayed
            assert jobs.wait(1.0) is False and studies.wait(0) is False
            assert relay.relayed == before
    finally:
        relay.stop()
        engine.dispose()
