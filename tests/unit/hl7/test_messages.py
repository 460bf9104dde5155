"""HL7 v2 parsing, ORU^R01 report notices, ACKs and the ORM priority update."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from triage_node.domain import field_name
from triage_node.hl7.messages import (
    HL7Error,
    acknowledgement,
    parse,
    priority_update,
    report_notices,
)

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
FIELDS = ["OBR-18", "OBR-3"]


def oru(*obrs: str, extra: str = "", msh_type: str = "ORU^R01") -> str:
    segments = [
        f"MSH|^~\\&|RIS|HOSP|TRIAGE|HOSP|20261123100000||{msh_type}|MSG0001|P|2.5.1",
        "PID|1||12345^^^HOSP||DOE^JANE",
        *obrs,
    ]
    if extra:
        segments.append(extra)
    return "\r".join(segments) + "\r"


def obr(status: str, accession: str = "ACC9", filler: str = "") -> str:
    fields = [""] * 25
    fields[0], fields[2], fields[17], fields[24] = "1", filler, accession, status
    return "OBR|" + "|".join(fields)


def test_field_names() -> None:
    assert field_name("OBR-18") == ("OBR", 18)
    assert field_name(" orc-3 ") == ("ORC", 3)
    for bad in ("OBR", "OBR-0", "OB-1", "OBR18"):
        with pytest.raises(ValueError):
            field_name(bad)


def test_parse_counts_msh_fields_from_the_separator() -> None:
    message = parse(oru(obr("F")))
    assert message.message_type == ("ORU", "R01")
    assert message.control_id == "MSG0001" and message.version == "2.5.1"
    assert message.header.field(1) == "|" and message.header.field(3) == "RIS"


def test_final_and_corrected_results_are_reports() -> None:
    notices = report_notices(parse(oru(obr("F"), obr("C", "ACC8"), obr("P", "ACC7"))), FIELDS)
    assert [(n.accession_number, n.result_status, n.reported) for n in notices] == [
        ("ACC9", "F", True),
        ("ACC8", "C", True),
        ("ACC7", "P", False),
    ]


def test_accession_falls_back_to_the_next_field_and_escapes_are_resolved() -> None:
    [notice] = report_notices(parse(oru(obr("F", accession="", filler="A\\S\\1"))), FIELDS)
    assert notice.accession_number == "A^1"
    [from_orc] = report_notices(parse(oru("ORC|RE||ORC-ACC", obr("F", accession=""))), ["ORC-3"])
    assert from_orc.accession_number == "ORC-ACC"


def test_zds_names_the_study() -> None:
    [notice] = report_notices(
        parse(oru(obr("F"), extra="ZDS|1.2.840.99.1^100^Application^DICOM")), FIELDS
    )
    assert notice.study_uid == "1.2.840.99.1"


def test_line_feeds_are_accepted_as_segment_ends() -> None:
    assert len(report_notices(parse(oru(obr("F")).replace("\r", "\n")), FIELDS)) == 1


@pytest.mark.parametrize(
    ("text", "code", "words"),
    [
        ("", "100", "MSH"),
        ("PID|1\r", "100", "MSH"),
        ("MSH|\r", "100", "MSH"),
        ("MSHA^~\\&|x\r", "101", "separators"),
        ("MSH|^~\\&|RIS||||||||P|2.5\r", "101", "MSH-9"),
        ("MSH|^~\\&|RIS||||||ORU^R01||P|2.5\r", "101", "MSH-10"),
        (oru(obr("F"), msh_type="ADT^A01"), "200", "not ORU^R01"),
        (oru(), "100", "no OBR"),
        (oru(obr("")), "101", "OBR-25"),
        (oru(obr("F", accession="")), "101", "accession"),
        (oru(obr("F"), "bad segment"), "100", "segment 4"),
    ],
)
def test_malformed_messages_say_why(text: str, code: str, words: str) -> None:
    with pytest.raises(HL7Error) as caught:
        report_notices(parse(text), FIELDS)
    assert caught.value.code == code and words in str(caught.value)


def test_acknowledgements() -> None:
    message = parse(oru(obr("F")))
    ack = parse(acknowledgement(message, "AA", "1 study marked reported", NOW, "ACK1"))
    assert ack.message_type == ("ACK", "R01")
    assert ack.header.field(3) == "TRIAGE" and ack.header.field(5) == "RIS"
    [msa] = ack.all("MSA")
    assert msa.fields[1:4] == ("AA", "MSG0001", "1 study marked reported")
    assert ack.all("ERR") == []

    error = parse(acknowledgement(message, "AE", "no OBR|here", NOW, "ACK2", "100"))
    assert error.component(error.all("MSA")[0], 1) == "AE"
    assert error.component(error.all("MSA")[0], 3) == "no OBR|here"  # escaped, then read back
    assert error.component(error.all("ERR")[0], 3) == "100"

    bare = parse(acknowledgement(None, "AR", "not HL7", NOW, "ACK3", "100"))
    assert bare.all("MSA")[0].fields[1:3] == ("AR", "")


def test_priority_update_is_an_order_change_to_stat() -> None:
    text = priority_update(
        accession_number="ACC|9",
        study_uid="1.2.3",
        sending_application="TRIAGE_NODE",
        receiving_application="RIS",
        control_id="ESC1",
        now=NOW,
    )
    message = parse(text)
    assert message.message_type == ("ORM", "O01") and message.control_id == "ESC1"
    [orc], [obr_segment], [zds] = message.all("ORC"), message.all("OBR"), message.all("ZDS")
    assert message.component(orc, 1) == "XO" and message.component(orc, 7, 6) == "S"
    assert message.component(obr_segment, 18) == "ACC|9"
    assert message.component(obr_segment, 3) == "ACC|9"
    assert message.component(obr_segment, 27, 6) == "S"
    assert message.component(zds, 1) == "1.2.3"
