"""Sending result objects to a PACS: C-STORE SCU over one association per batch (PS3.4 B.2).

Each file's answer is classified once, here, so callers only decide what to do next:

- ``sent``: Success (0x0000), or a Warning (0x0001, 0xB000, 0xB006, 0xB007): the PACS kept it;
- ``failed``: a Failure status (0xA7xx out of resources, 0xA9xx mismatch, 0xCxxx cannot
  understand, others): kept with the status and its Error Comment, retried later;
- ``unreachable``: no association (refused, timed out, no answer): the destination is down.

Nothing here blocks receiving or inference: it runs from the scheduler, one batch at a time.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.association import Association
from pynetdicom.presentation import build_context

from triage_node.dicom.identity import node_ae
from triage_node.dicom.status import DeliveryOutcome, classify_store_status
from triage_node.domain import Destination, TlsFiles


@dataclass(frozen=True, slots=True)
class Sent:
    """What happened to one file."""

    path: Path
    outcome: DeliveryOutcome
    status: int | None = None
    detail: str = ""


def send_files(
    files: Sequence[Path],
    destination: Destination,
    *,
    calling_ae: str,
    timeout: float = 30.0,
    tls: TlsFiles | None = None,
) -> list[Sent]:
    """C-STORE every file to *destination* over one association; one :class:`Sent` per file."""
    datasets = []
    results: list[Sent] = []
    for path in files:
        try:
            # The header names the presentation context; the file itself is sent from disk.
            datasets.append((path, dcmread(path, stop_before_pixels=True)))
        except (OSError, InvalidDicomError) as exc:
            results.append(
                Sent(path, DeliveryOutcome.FAILED, None, f"cannot read the result file: {exc}")
            )
    if not datasets:
        return results
    ae = node_ae(calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    contexts = {
        str(ds.SOPClassUID): sorted(
            {str(ds.file_meta.TransferSyntaxUID), ExplicitVRLittleEndian, ImplicitVRLittleEndian}
        )
        for _, ds in datasets
    }
    ae.requested_contexts = [build_context(sop, syntaxes) for sop, syntaxes in contexts.items()]
    tls_args = None
    if destination.tls:
        try:
            tls_args = ((tls or TlsFiles()).context(), destination.host)
        except (OSError, ssl.SSLError) as exc:
            return results + [
                Sent(path, DeliveryOutcome.FAILED, None, f"TLS set-up failed: {exc}")
                for path, _ in datasets
            ]
    assoc = ae.associate(
        destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args
    )
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
        return results + [
            Sent(path, DeliveryOutcome.UNREACHABLE, None, f"association {why}: {destination}")
            for path, _ in datasets
        ]
    try:
        for path, _ in datasets:
            results.append(_store_one(assoc, path))
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def _store_one(assoc: Association, path: Path) -> Sent:
    if not assoc.is_established:
        return Sent(path, DeliveryOutcome.UNREACHABLE, None, "association lost")
    try:
        answer = assoc.send_c_store(path)
    except (ValueError, RuntimeError, OSError) as exc:  # no accepted context, or unreadable
        return Sent(path, DeliveryOutcome.FAILED, None, f"not sent: {exc}")
    if "Status" not in answer:
        return Sent(
            path, DeliveryOutcome.UNREACHABLE, None, "no response (timeout or association aborted)"
        )
    status = int(answer.Status)
    comment = str(answer.get("ErrorComment", ""))
    return Sent(path, classify_store_status(status), status, comment)
