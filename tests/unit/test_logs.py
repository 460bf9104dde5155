import json
import logging

import pytest

from triage_node import logs
from triage_node.logs import JsonFormatter, TextFormatter


def record(**extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("triage_node.x", logging.INFO, __file__, 1, "stored %s", ("it",), None)
    rec.__dict__.update(extra)
    return rec


def test_json_lines_carry_action_and_fields() -> None:
    line = JsonFormatter().format(record(action="instance_stored", sop_instance_uid="1.2.3"))
    entry = json.loads(line)
    assert entry["action"] == "instance_stored"
    assert entry["sop_instance_uid"] == "1.2.3"
    assert entry["message"] == "stored it"
    assert entry["level"] == "INFO"


def test_text_lines_are_key_value() -> None:
    line = TextFormatter().format(record(action="x", peer="127.0.0.1", note="two words"))
    assert "stored it action=x peer=127.0.0.1" in line
    assert 'note="two words"' in line


def test_a_failure_that_repeats_every_tick_is_logged_once_a_minute(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: now[0])
    failures = logs.RepeatedFailure(logging.getLogger("test.repeat"), "thing_failed", every=60)
    with caplog.at_level(logging.INFO, logger="test.repeat"):
        for _ in range(400):  # a tick every quarter second for 100 s
            failures.failed(logging.WARNING, "database unavailable")
            now[0] += 0.25
        failures.succeeded()
        failures.succeeded()  # nothing more: it was over already
    seen = [(r.action, getattr(r, "repeated", None)) for r in caplog.records]
    assert seen == [("thing_failed", None), ("thing_failed", 239), ("thing_failed_over", 159)]
