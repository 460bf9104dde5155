"""The DCMTK transport's Python side without the program: the AE title rules, the header and
status messages, the command line, and what building says when it cannot."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from triage_node.config import DicomConfig
from triage_node.dicom.native import build
from triage_node.dicom.native.handover import (
    ACCEPT,
    CALLED_AE_NOT_RECOGNIZED,
    CALLING_AE_NOT_RECOGNIZED,
    HEADER_FIELDS,
    _header,
    _status,
    ae_title_verdict,
    program_arguments,
)
from triage_node.dicom.storage_scp import TRANSFER_SYNTAXES, supported_contexts
from triage_node.domain import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from triage_node.errors import TriageError

STUDY, SERIES, SOP = "1.2.3", "1.2.3.4", "1.2.3.4.5"
DX = "1.2.840.10008.5.1.4.1.1.1.1"


def test_ae_title_rules_match_the_pynetdicom_transports() -> None:
    config = DicomConfig(ae_title="NODE", allowed_calling_aes=["PACS"])
    assert ae_title_verdict(config, "PACS", "NODE") == ACCEPT
    assert ae_title_verdict(config, "PACS  ", "NODE  ") == ACCEPT  # padding is not a title
    assert ae_title_verdict(config, "PACS", "OTHER") == CALLED_AE_NOT_RECOGNIZED
    assert ae_title_verdict(config, "INTRUDER", "NODE") == CALLING_AE_NOT_RECOGNIZED
    assert ae_title_verdict(config, "INTRUDER", "OTHER") == CALLED_AE_NOT_RECOGNIZED  # first
    anyone = DicomConfig(ae_title="NODE", require_called_ae=False)
    assert ae_title_verdict(anyone, "WHOEVER", "OTHER") == ACCEPT


def test_the_header_dcmtk_read_becomes_the_nodes() -> None:
    values = [STUDY, SERIES, SOP, DX, "1.2.840.10008.1.2.1", "DX", "HAND ", "PA", "A1", ""]
    header = _header(values)
    assert header is not None
    assert HEADER_FIELDS[:3] == ("study_uid", "series_uid", "sop_instance_uid")
    assert (header.study_uid, header.sop_class_uid, header.body_part) == (STUDY, DX, "HAND")
    assert _header([]) is None  # DCMTK could not read it: the node reads the file itself
    assert _header(values[:-1]) is None
    assert _header(["../etc", *values[1:]]) is None  # the node's own reading refuses it


def test_a_status_answer_carries_a_short_ascii_comment() -> None:
    assert _status(0x0000, "") == struct.pack("<HH", 0, 0)
    answer = _status(0xC000, "é\\" + "x" * 100)
    code, length = struct.unpack("<HH", answer[:4])
    assert (code, length) == (0xC000, 64)
    assert answer[4:] == b"??" + b"x" * 62  # one LO value: no backslash


def test_the_program_accepts_what_the_pynetdicom_transport_accepts() -> None:
    config = DicomConfig(
        ae_title="NODE", acse_timeout=7.4, dimse_timeout=8.6, network_timeout=0.2, max_pdu_size=0
    )
    arguments = program_arguments(config, 9, Path("/spool/incoming"))
    assert arguments[:9] == [
        "9",
        "/spool/incoming",
        "NODE",
        IMPLEMENTATION_CLASS_UID,
        IMPLEMENTATION_VERSION_NAME,
        "7",
        "9",
        "1",  # at least a second
        "0",
    ]
    assert arguments[9].split(",") == [str(uid) for uid in TRANSFER_SYNTAXES]
    abstract = arguments[10].split(",")
    assert abstract == [str(cx.abstract_syntax) for cx in supported_contexts()]
    assert "1.2.840.10008.1.1" in abstract and DX in abstract


def test_building_without_a_compiler_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    with pytest.raises(TriageError, match="g\\+\\+ libdcmtk-dev"):
        build.build_program(tmp_path / "program")
    assert not (tmp_path / "program").exists()


def test_a_program_is_named_after_its_source(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An upgraded package never runs the program an older one built."""
    source = tmp_path / "receiver.cpp"
    source.write_text("int main() { return 0; }\n")
    monkeypatch.setattr(build, "SOURCE", source)
    first = build.program_name()
    source.write_text("int main() { return 1; }\n")
    assert build.program_name() != first
    assert build.find_program(tmp_path / "data") is None


def _no_program(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "find_program", lambda _data_dir: None)


def test_auto_without_a_compiler_or_dcmtk_headers_says_why_and_builds_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _no_program(monkeypatch)
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    assert build.available(tmp_path) == (
        None,
        "no C++ compiler to build DCMTK's receiver (apt-get install g++ libdcmtk-dev)",
    )
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(build, "_HEADER", tmp_path / "no" / "scpthrd.h")
    program, reason = build.available(tmp_path)
    assert program is None and reason.startswith("DCMTK's headers are missing")
    assert not any(tmp_path.iterdir())  # nothing was built, or tried


def test_auto_refuses_a_program_that_does_not_start(tmp_path: Path) -> None:
    """A program built against a DCMTK that an upgrade removed fails in the dynamic loader."""
    broken = tmp_path / "dcmtk-receiver"
    broken.write_text(
        "#!/bin/sh\necho 'error while loading shared libraries: libdcmnet.so.17' >&2\nexit 127\n"
    )
    broken.chmod(0o755)
    assert build.starts(broken) == (
        "the DCMTK receiver does not start: error while loading shared libraries: libdcmnet.so.17"
    )
    usage = tmp_path / "usage"
    usage.write_text("#!/bin/sh\necho 'usage: dcmtk-receiver CONTROL_FD ...' >&2\nexit 2\n")
    usage.chmod(0o755)
    assert build.starts(usage) is None
    assert build.starts(tmp_path / "missing").startswith("the DCMTK receiver does not start")


def test_choosing_the_transport(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from triage_node.config import Config, StorageConfig
    from triage_node.service import supervisor

    def config(transport: str) -> Config:
        return Config(
            dicom=DicomConfig(transport=transport), storage=StorageConfig(data_dir=tmp_path)
        )

    assert DicomConfig().transport == "auto"  # the default
    program = tmp_path / "dcmtk-receiver"
    monkeypatch.setattr(supervisor, "available", lambda _data_dir: (program, ""))
    assert supervisor.choose_transport(config("auto")).dicom.transport == "dcmtk"
    assert supervisor.choose_transport(config("pynetdicom")).dicom.transport == "pynetdicom"
    monkeypatch.setattr(supervisor, "available", lambda _data_dir: (None, "no C++ compiler"))
    chosen = supervisor.choose_transport(config("auto"))
    assert chosen.dicom.transport == "pynetdicom"
    assert chosen.storage == config("auto").storage  # the rest as it was
    monkeypatch.setattr(supervisor, "ensure_program", lambda _data_dir: program)
    assert supervisor.choose_transport(config("dcmtk")).dicom.transport == "dcmtk"
