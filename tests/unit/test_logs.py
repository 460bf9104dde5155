import json
import logging

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
