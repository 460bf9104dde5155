"""Sending result objects to a DICOMweb origin server by STOW-RS (PS3.18 10.5), with
``dicomweb-client`` (the Imaging Data Commons' client library, over requests).

One request per study, into ``{base}/studies/{StudyInstanceUID}``; each file's fate is read
from the response, as C-STORE statuses are in ``dicom/storage_scu``:

- ``sent``: in the Referenced SOP Sequence (a Warning Reason counts as kept);
- ``failed``: in the Failed SOP Sequence (its Failure Reason is the status), missing from the
  response, refused (401/403/409/413/415...), or not readable here;
- ``unreachable``: no HTTP answer (refused, timed out, TLS failed) or a 5xx: the server is down.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from triage_node.config import DeliveryConfig
from triage_node.dicom.status import PROCESSING_FAILURE, DeliveryOutcome
from triage_node.dicom.storage_scu import Sent
from triage_node.domain import TlsFiles, WebDestination
from triage_node.errors import TriageError


@dataclass(frozen=True)
class WebCredentials:
    """How the node authenticates to DICOMweb destinations (``delivery.web_*``)."""

    token_file: Path | None = None
    user: str = ""
    password_file: Path | None = None

    @classmethod
    def from_config(cls, delivery: DeliveryConfig) -> WebCredentials:
        """The credentials ``[delivery]`` names (``web_token_file``, ``web_user`` and
        ``web_password_file``): used for STOW-RS destinations and QIDO-RS report look-ups."""
        return cls(delivery.web_token_file, delivery.web_user, delivery.web_password_file)

    def header(self) -> dict[str, str]:
        """The Authorization header; TriageError when a configured file cannot be read."""
        try:
            if self.token_file is not None:
                token = self.token_file.read_text(encoding="utf-8").strip()
                return {"Authorization": f"Bearer {token}"}
            if self.user:
                password = (
                    self.password_file.read_text(encoding="utf-8").rstrip("\r\n")
                    if self.password_file is not None
                    else ""
                )
                pair = base64.b64encode(f"{self.user}:{password}".encode()).decode()
                return {"Authorization": f"Basic {pair}"}
        except OSError as exc:
            raise TriageError(f"cannot read a DICOMweb credential file: {exc.strerror}") from None
        return {}


def send_files_stow(
    files: Sequence[Path],
    destination: WebDestination,
    *,
    credentials: WebCredentials,
    timeout: float = 30.0,
    tls: TlsFiles | None = None,
) -> list[Sent]:
    """STOW-RS every file to *destination*; one :class:`Sent` per file, in order."""
    results: dict[Path, Sent] = {}
    by_study: dict[str, list[tuple[Path, Dataset]]] = {}
    for path in files:
        try:
            dataset = dcmread(path)
            by_study.setdefault(str(dataset.StudyInstanceUID), []).append((path, dataset))
        except (OSError, InvalidDicomError, AttributeError) as exc:
            results[path] = Sent(path, DeliveryOutcome.FAILED, None, f"cannot read: {exc}")
    if by_study:
        try:
            session = web_session(credentials, tls)
        except (TriageError, OSError) as exc:
            detail = f"DICOMweb set-up failed: {exc}"
            return [results.get(p) or Sent(p, DeliveryOutcome.FAILED, None, detail) for p in files]
        with session:
            client = DICOMwebClient(destination.url, session=session, timeout=timeout)
            for study, items in by_study.items():
                for sent in _store_study(client, study, items):
                    results[sent.path] = sent
    return [results[path] for path in files]


def web_session(credentials: WebCredentials, tls: TlsFiles | None) -> requests.Session:
    session = requests.Session()
    session.headers.update(credentials.header())
    if tls is not None and tls.ca_file is not None:
        session.verify = str(tls.ca_file)
    if tls is not None and tls.cert_file is not None:
        session.cert = (str(tls.cert_file), str(tls.key_file or tls.cert_file))
    return session


def _store_study(
    client: DICOMwebClient, study: str, items: list[tuple[Path, Dataset]]
) -> list[Sent]:
    datasets = [dataset for _, dataset in items]
    try:
        response = client.store_instances(datasets, study_instance_uid=study)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status >= 500:
            return _all(items, DeliveryOutcome.UNREACHABLE, f"HTTP {status} from the server")
        refused = _response_body(exc.response)
        if refused is None:
            return _all(items, DeliveryOutcome.FAILED, f"refused: HTTP {status}")
        return _read_response(items, refused)
    except (requests.ConnectionError, requests.Timeout) as exc:
        return _all(items, DeliveryOutcome.UNREACHABLE, f"no answer: {type(exc).__name__}")
    except (requests.RequestException, ValueError) as exc:
        return _all(items, DeliveryOutcome.FAILED, f"not sent: {exc}")
    return _read_response(items, response)


def _response_body(response: requests.Response | None) -> Dataset | None:
    """The Store Instances Response of a refused request (409), when it has one."""
    if response is None or "json" not in response.headers.get("Content-Type", ""):
        return None
    try:
        return Dataset.from_json(response.json())
    except (ValueError, TypeError):
        return None


def _read_response(items: list[tuple[Path, Dataset]], response: Dataset) -> list[Sent]:
    stored = {
        str(item.get("ReferencedSOPInstanceUID", "")): int(item.get("WarningReason", 0))
        for item in response.get("ReferencedSOPSequence", [])
    }
    failed = {
        str(item.get("ReferencedSOPInstanceUID", "")): int(
            item.get("FailureReason", PROCESSING_FAILURE)
        )
        for item in response.get("FailedSOPSequence", [])
    }
    results = []
    for path, dataset in items:
        uid = str(dataset.SOPInstanceUID)
        if uid in stored:
            results.append(Sent(path, DeliveryOutcome.SENT, stored[uid]))
        elif uid in failed:
            reason = failed[uid]
            results.append(Sent(path, DeliveryOutcome.FAILED, reason, f"failure 0x{reason:04X}"))
        else:
            results.append(Sent(path, DeliveryOutcome.FAILED, None, "not in the STOW-RS response"))
    return results


def _all(items: list[tuple[Path, Dataset]], outcome: DeliveryOutcome, detail: str) -> list[Sent]:
    return [Sent(path, outcome, None, detail) for path, _ in items]
