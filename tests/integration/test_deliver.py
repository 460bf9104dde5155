"""C-STORE SCU of result objects against real peers: DCMTK storescp and pynetdicom SCPs that
answer with a warning or a failure status."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, evt

from tests.support.peers import StoreSCP, free_port, require_shared_dicom
from tests.support.pki import make_pki
from triage_node.analysis.preprocess import InputSpec, preprocess
from triage_node.analysis.render import heatmap
from triage_node.dicom.status import DeliveryOutcome
from triage_node.dicom.storage_scu import send_files
from triage_node.domain import Destination, TlsFiles
from triage_node.results.common import Algorithm, AnalysedImage, ResultUIDs
from triage_node.results.kos import key_objects
from triage_node.results.sc import heatmap_capture
from triage_node.results.sr import structured_report

ALGORITHM = Algorithm("fracture-v1", "1.0.0", "high_sensitivity", 0.3)


@pytest.fixture
def result_files(tmp_path: Path) -> list[Path]:
    source = require_shared_dicom() / "CR_RG2_hip_mono2_10bit_uncompressed.dcm"
    header = pydicom.dcmread(source, stop_before_pixels=True)
    ready = preprocess(pydicom.dcmread(source), InputSpec(size=64))
    image = AnalysedImage(header, 0.9, True, 100, 100, 0.02)
    uids = ResultUIDs(str(header.StudyInstanceUID), "1.0.0", 1)
    cam = np.eye(8, dtype=np.float32)
    objects = [
        structured_report([image], ALGORITHM, uids),
        heatmap_capture(image, heatmap(ready.display, cam, ready.geometry, 64), ALGORITHM, uids, 0),
        key_objects([image], ALGORITHM, uids),
    ]
    paths = []
    for index, dataset in enumerate(objects):
        path = tmp_path / f"result{index}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_destination_parsing() -> None:
    assert Destination.parse("ORTHANC@pacs.example.org:4242") == Destination(
        "ORTHANC", "pacs.example.org", 4242
    )
    assert str(Destination.parse(" PACS@10.0.0.5:104 ")) == "PACS@10.0.0.5:104"
    for bad in (
        "PACS",
        "PACS@host",
        "@host:104",
        "PACS@host:0",
        "PACS@host:70000",
        "A_TITLE_LONGER_THAN_16@h:1",
    ):
        with pytest.raises(ValueError, match="AE_TITLE@host:port"):
            Destination.parse(bad)


def test_storescp_receives_sr_sc_and_ko(tmp_path: Path, result_files: list[Path]) -> None:
    scp = StoreSCP(tmp_path / "received")
    try:
        sent = send_files(
            result_files, Destination("STORESCP", "127.0.0.1", scp.port), calling_ae="TRIAGE_NODE"
        )
    finally:
        scp.stop()
    assert [s.outcome for s in sent] == [DeliveryOutcome.SENT] * 3 and all(
        s.status == 0 for s in sent
    )
    received = {pydicom.dcmread(p).SOPInstanceUID for p in (tmp_path / "received").iterdir()}
    assert received == {pydicom.dcmread(p).SOPInstanceUID for p in result_files}


def test_nobody_listening_is_unreachable(result_files: list[Path]) -> None:
    sent = send_files(
        result_files, Destination("NOBODY", "127.0.0.1", free_port()), calling_ae="T", timeout=5
    )
    assert [s.outcome for s in sent] == [DeliveryOutcome.UNREACHABLE] * 3
    assert "NOBODY@127.0.0.1" in sent[0].detail


@pytest.fixture
def answering_scp() -> Iterator[tuple[int, list[int]]]:
    """A pynetdicom Storage SCP answering with the statuses in the returned list, in turn."""
    statuses: list[int] = []

    def handle(event: evt.Event) -> Dataset | int:
        status = statuses.pop(0) if statuses else 0x0000
        if status in (0x0000,):
            return status
        answer = Dataset()
        answer.Status = status
        answer.ErrorComment = "disk full on the PACS" if status >= 0xA000 else "coerced"
        return answer

    ae = AE(ae_title="FUSSY")
    ae.supported_contexts = StoragePresentationContexts
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)]
    )
    try:
        yield port, statuses
    finally:
        server.shutdown()


def test_failure_and_warning_statuses_are_told_apart(
    answering_scp: tuple[int, list[int]], result_files: list[Path]
) -> None:
    port, statuses = answering_scp
    statuses.extend([0xB000, 0xA700, 0xC000])
    sent = send_files(result_files, Destination("FUSSY", "127.0.0.1", port), calling_ae="T")
    assert [(s.outcome, s.status) for s in sent] == [
        (DeliveryOutcome.SENT, 0xB000),
        (DeliveryOutcome.FAILED, 0xA700),
        (DeliveryOutcome.FAILED, 0xC000),
    ]
    assert sent[1].detail == "disk full on the PACS"


def test_an_unreadable_result_file_fails_alone(
    tmp_path: Path, answering_scp: tuple[int, list[int]], result_files: list[Path]
) -> None:
    port, _ = answering_scp
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not DICOM")
    sent = send_files(
        [broken, *result_files], Destination("FUSSY", "127.0.0.1", port), calling_ae="T"
    )
    assert [s.outcome for s in sent] == [
        DeliveryOutcome.FAILED,
        DeliveryOutcome.SENT,
        DeliveryOutcome.SENT,
        DeliveryOutcome.SENT,
    ]
    assert "cannot read the result file" in sent[0].detail


def test_tls_destination_verified_against_the_configured_ca(
    tmp_path: Path, result_files: list[Path]
) -> None:
    pki = make_pki(tmp_path / "pki")
    scp = StoreSCP(tmp_path / "received", "+tls", str(pki["server-key"]), str(pki["server"]), "-ic")
    try:
        target = Destination.parse(f"STORESCP@127.0.0.1:{scp.port}+tls")
        assert target.tls and str(target).endswith("+tls")
        sent = send_files(result_files, target, calling_ae="T", tls=TlsFiles(ca_file=pki["ca"]))
        assert [s.outcome for s in sent] == [DeliveryOutcome.SENT] * 3
        untrusted = send_files(result_files, target, calling_ae="T", timeout=10)
        assert [s.outcome for s in untrusted] == [
            DeliveryOutcome.UNREACHABLE
        ] * 3  # system CAs do not know it
    finally:
        scp.stop()
    assert len(list((tmp_path / "received").iterdir())) == 3
