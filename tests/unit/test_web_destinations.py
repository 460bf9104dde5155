"""DICOMweb destinations: parsing (domain) and reading a STOW-RS response (dicomweb)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from triage_node.dicom.status import DeliveryOutcome
from triage_node.dicomweb.stow_client import WebCredentials, _read_response
from triage_node.domain import Destination, WebDestination, parse_destination
from triage_node.errors import TriageError


def test_destinations_are_dimse_or_web() -> None:
    assert isinstance(parse_destination("PACS@10.0.0.5:104"), Destination)
    web = parse_destination("https://pacs.example.org:8443/dicom-web/")
    assert isinstance(web, WebDestination)
    assert str(web) == "https://pacs.example.org:8443/dicom-web"
    assert (web.host, web.port) == ("pacs.example.org", 8443)
    assert WebDestination.parse("http://pacs/dicom-web").port == 80


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("https://user:secret@pacs/dicom-web", "must not hold credentials"),
        ("ftp://pacs/dicom-web", "is not AE_TITLE@host:port"),
        ("https://pacs/dicom-web?x=1", "no query"),
    ],
)
def test_bad_web_destinations_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_destination(text)


def item(uid: str, **values: int) -> Dataset:
    ds = Dataset()
    ds.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    ds.ReferencedSOPInstanceUID = uid
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_each_file_gets_its_fate_from_the_response(tmp_path: Path) -> None:
    files = []
    for uid in ("1.1", "1.2", "1.3"):
        ds = Dataset()
        ds.SOPInstanceUID = uid
        files.append((tmp_path / f"{uid}.dcm", ds))
    response = Dataset()
    response.ReferencedSOPSequence = [item("1.1")]
    response.FailedSOPSequence = [item("1.2", FailureReason=0xA700)]
    sent = _read_response(files, response)
    assert [s.outcome for s in sent] == [
        DeliveryOutcome.SENT,
        DeliveryOutcome.FAILED,
        DeliveryOutcome.FAILED,
    ]
    assert sent[1].status == 0xA700 and "not in the STOW-RS response" in sent[2].detail


def test_credentials_become_an_authorization_header(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("abc\n")
    (tmp_path / "password").write_text("pw\n")
    assert WebCredentials(tmp_path / "token").header() == {"Authorization": "Bearer abc"}
    basic = WebCredentials(None, "node", tmp_path / "password").header()
    assert basic == {"Authorization": "Basic bm9kZTpwdw=="}
    assert WebCredentials().header() == {}
    with pytest.raises(TriageError, match="cannot read"):
        WebCredentials(tmp_path / "missing").header()
