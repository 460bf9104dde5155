"""The HL7 ORU^R01 listener over a real MLLP socket, and the RIS priority update of an
escalation sent to a plain socket RIS, on SQLite and PostgreSQL."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from tests.support.hl7msgs import oru
from tests.support.peers import free_port
from tests.support.records import header
from triage_node.config import load_config
from triage_node.db.database import Database
from triage_node.db.priority import PriorityState, ReportSource
from triage_node.domain import ImageResult, SpooledFile, StudyAnalysis
from triage_node.hl7.messages import parse
from triage_node.hl7.mllp import END, START, FrameReader, MLLPServer, frame, send
from triage_node.service.escalation import Escalator
from triage_node.service.reconciliation import OruHandler

T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


def flagged_study(store: Database, study: str, accession: str) -> None:
    h = replace(header(study=study, sop=study + ".1.1"), accession_number=accession)
    store.intake.record_instance(h, SpooledFile(f"{study}.dcm", 10, False), None, T0)
    [ready] = [
        r
        for r in store.intake.ready_studies(T0, timedelta(0), timedelta(1))
        if r.study_uid == study
    ]
    store.queue.enqueue(ready, T0)
    job = store.queue.claim("w", T0, timedelta(minutes=1))
    assert job is not None
    image = ImageResult(job.study_id, h.sop_instance_uid, 0.9, 1, 1, 1, 0, 1)
    assert store.queue.complete(
        job, "w", StudyAnalysis((image,), (), "m", "1", "CPU", 0.3, 0.7, 1), T0
    )


@pytest.fixture
def listener(store: Database) -> Iterator[MLLPServer]:
    server = MLLPServer(("127.0.0.1", 0), OruHandler(store.priority, ["OBR-18", "OBR-3"]))
    server.start()
    yield server
    server.stop()


def ack_of(answer: bytes) -> tuple[str, str, str]:
    message = parse(answer.decode())
    msa = message.all("MSA")[0]
    return message.component(msa, 1), message.component(msa, 2), message.component(msa, 3)


def test_final_report_marks_the_study_reported(store: Database, listener: MLLPServer) -> None:
    flagged_study(store, "1.3.1", "ACC-1")
    flagged_study(store, "1.3.2", "ACC-2")
    # A preliminary result changes nothing; the final one reports the study.
    code, control, _ = ack_of(send("127.0.0.1", listener.port, oru("P", "ACC-1", "C0"), 5))
    assert (code, control) == ("AA", "C0")
    assert store.priority.row("1.3.1").state == PriorityState.FLAGGED  # type: ignore[union-attr]
    code, control, text = ack_of(send("127.0.0.1", listener.port, oru("F", "ACC-1", "C1"), 5))
    assert (code, control, text) == ("AA", "C1", "1 study marked reported")
    row = store.priority.row("1.3.1")
    assert row is not None and row.state == PriorityState.REPORTED
    assert row.report_source == ReportSource.HL7
    assert store.priority.row("1.3.2").state == PriorityState.FLAGGED  # type: ignore[union-attr]
    # The same message again is acknowledged and changes nothing.
    assert ack_of(send("127.0.0.1", listener.port, oru("F", "ACC-1", "C2"), 5))[2] == (
        "0 studies marked reported"
    )
    # Unknown accession: accepted (the RIS must not resend it), nothing changes.
    assert ack_of(send("127.0.0.1", listener.port, oru("C", "NOT-HERE", "C3"), 5))[0] == "AA"
    # ZDS names the study even when the accession number differs.
    send("127.0.0.1", listener.port, oru("C", "OTHER", "C4", zds="1.3.2"), 5)
    assert store.priority.row("1.3.2").state == PriorityState.REPORTED  # type: ignore[union-attr]


def test_malformed_messages_get_an_error_ack_and_change_nothing(
    store: Database, listener: MLLPServer
) -> None:
    flagged_study(store, "1.3.5", "ACC-5")
    cases = {
        b"this is not HL7": "AR",
        b"MSH|^~\\&|RIS|HOSP|||2026||ADT^A01|X1|P|2.5\rPID|1\r": "AR",
        oru("F", "").replace(b"ACC", b""): "AE",  # no accession and no ZDS
        oru("", "ACC-5"): "AE",  # no result status
        oru("F", "ACC-5").replace(b"OBR|", b"obr|"): "AR",  # a broken segment name
        b"\xff\xfe\x00binary": "AR",
    }
    with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as sock:
        reader = FrameReader(sock)
        for message, expected in cases.items():  # many messages on one connection
            sock.sendall(frame(message))
            answer = reader.read()
            assert answer is not None
            assert ack_of(answer)[0] == expected, message
    assert store.priority.row("1.3.5").state == PriorityState.FLAGGED  # type: ignore[union-attr]


def test_broken_framing_drops_the_connection_not_the_listener(
    store: Database, listener: MLLPServer
) -> None:
    flagged_study(store, "1.3.6", "ACC-6")
    with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert sock.recv(100) == b""  # closed without an answer
    with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as sock:
        sock.sendall(START + b"MSH|^~\\&|half a message")  # then the peer goes away
    with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as sock:
        sock.sendall(START + b"x" * (1 << 20) + b"y" * 100)  # larger than the limit
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            for _ in range(100):
                sock.sendall(b"z" * 65536)
    assert ack_of(send("127.0.0.1", listener.port, oru("F", "ACC-6"), 5))[0] == "AA"
    assert store.priority.row("1.3.6").state == PriorityState.REPORTED  # type: ignore[union-attr]


def test_address_allow_list(store: Database) -> None:
    server = MLLPServer(("127.0.0.1", 0), OruHandler(store.priority, ["OBR-18"]), ["10.0.0.0/8"])
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(frame(oru("F", "ACC")))
            assert sock.recv(100) == b""
    finally:
        server.stop()


class PlainRis:
    """A RIS on a plain socket: keeps each framed message and answers AA."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while not data.endswith(END):
                    data += conn.recv(4096)
                text = data[1:-2].decode()
                self.received.append(text)
                control = parse(text).control_id
                conn.sendall(
                    frame(f"MSH|^~\\&|RIS||T||2026||ACK|A|P|2.3.1\rMSA|AA|{control}\r".encode())
                )

    def close(self) -> None:
        self.sock.close()


def test_escalation_sends_a_priority_update_to_the_ris(store: Database) -> None:
    flagged_study(store, "1.3.9", "ACC-9")
    ris = PlainRis()
    unused = free_port()
    try:
        for minutes, target in ((2, f"127.0.0.1:{ris.port}"), (4, f"127.0.0.1:{unused}")):
            config = load_config(
                environ={
                    "TRIAGE_NODE_ESCALATION_AFTER_SECONDS": "60",
                    "TRIAGE_NODE_ESCALATION_REPEAT_SECONDS": "60",
                    "TRIAGE_NODE_ESCALATION_RIS": target,
                    "TRIAGE_NODE_ESCALATION_TIMEOUT_SECONDS": "2",
                }
            )
            now = T0 + timedelta(minutes=minutes)
            escalator = Escalator(store.escalations, config, clock=lambda: now)  # noqa: B023
            assert escalator.escalate_due() == 1  # a RIS that is down does not stop escalation
            if target.endswith(str(ris.port)):
                [message] = ris.received
                orm = parse(message)
                assert orm.message_type == ("ORM", "O01")
                assert orm.component(orm.all("OBR")[0], 18) == "ACC-9"
                assert orm.component(orm.all("ZDS")[0], 1) == "1.3.9"
    finally:
        ris.close()
    row = store.priority.row("1.3.9")
    assert row is not None and row.escalations == 2


def test_database_unavailable_gets_an_error_ack_to_send_again(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from triage_node.db.engine import make_engine

    engine = make_engine(
        f"sqlite:///{tmp_path / 'no-schema.sqlite3'}"
    )  # no tables: every query fails
    try:
        answer = OruHandler(Database(engine).priority, ["OBR-18"])(oru("F", "ACC-1", "C9"))
    finally:
        engine.dispose()
    message = parse(answer.decode())
    assert message.component(message.all("MSA")[0], 1) == "AE"
    assert message.component(message.all("MSA")[0], 2) == "C9"
    assert message.component(message.all("ERR")[0], 3) == "207"
