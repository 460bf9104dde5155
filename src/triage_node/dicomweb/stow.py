"""STOW-RS, the Studies Store Transaction (PS3.18 10.5), as a WSGI application.

``POST {base}/studies`` and ``POST {base}/studies/{StudyInstanceUID}`` with
``multipart/related; type="application/dicom"``. The body is parsed as it streams in
(python-multipart); each part goes to a file in the spool's incoming directory and is stored
by :class:`triage_node.dicom.storing.Storer` the moment it ends — checked, fsynced, renamed,
committed — so the response lists an instance in the Referenced SOP Sequence only once it
would survive a crash. Everything else is in the Failed SOP Sequence with its PS3.18 Table
I.2-2 reason. A request plays the role of an association: it is recorded as one, so a study
settles once its last request has ended (admin guide, "When is a study complete?").

Responses (``application/dicom+json``): 200 every instance stored, 202 some stored and some
not, 409 none stored; 400 a body that is not the multipart it says, 401 no or wrong
credentials, 403 a source address not allowed, 404/405 another resource or method, 413 a body
over ``dicomweb.max_request_mb``, 415 another media type.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from python_multipart.multipart import MultipartParser, parse_options_header

from triage_node.credentials import Credentials, Principal
from triage_node.dicom.status import (
    CANNOT_UNDERSTAND,
    PROCESSING_FAILURE,
    STUDY_UID_MISMATCH,
    SUCCESS,
)
from triage_node.dicom.storing import Stored, Storer
from triage_node.domain import AssociationEnd, InstanceHeader, is_valid_uid
from triage_node.errors import DatabaseUnavailable
from triage_node.logs import get_logger, log_event
from triage_node.networks import AllowedNetworks

if TYPE_CHECKING:  # the aggregate is passed in by the service
    from triage_node.db.intake import Intake

LOG = get_logger(__name__)

CHUNK = 256 * 1024
CALLING_AE = "STOW-RS"  # how a request appears among the associations
Environ = dict[str, Any]
StartResponse = Callable[..., Any]

_STUDIES = re.compile(r"^/studies(?:/(?P<study>[^/]+))?/?$")


@dataclass
class _Outcome:
    """One part of the request and what became of it."""

    code: int
    comment: str = ""
    sop_class_uid: str = ""
    sop_instance_uid: str = ""


@dataclass
class _Part:
    path: Path
    file: IO[bytes]
    headers: dict[str, str] = field(default_factory=dict)


class _TooLarge(Exception):
    pass


class StowApplication:
    """The WSGI application of the STOW-RS receiver."""

    def __init__(
        self,
        storer: Storer,
        intake: Intake,
        incoming: Path,
        credentials: Credentials,
        *,
        base_path: str = "/dicom-web",
        allowed_networks: Iterable[str] = (),
        max_request_bytes: int = 2**30,
        called_ae: str = "TRIAGE_NODE",
        on_request_end: Callable[[], None] | None = None,
        client_certificates: bool = False,
    ) -> None:
        self.storer = storer
        self.intake = intake
        self.incoming = incoming
        self.credentials = credentials
        self.base_path = base_path
        self.allowed = AllowedNetworks(allowed_networks)
        self.max_request_bytes = max_request_bytes
        self.called_ae = called_ae
        self.on_request_end = on_request_end
        self.client_certificates = client_certificates  # mutual TLS authenticates the client
        self._counter = 0
        self._lock = threading.Lock()

    # -- WSGI --------------------------------------------------------------------------------

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        try:
            status, body = self._handle(environ)
        except Exception:  # a bug must not take the server down; nothing was reported stored
            LOG.exception("STOW-RS request failed", extra={"action": "stow_failed"})
            status, body = 503, _error("internal error; see the node's log")
        headers = [
            ("Content-Type", "application/dicom+json"),
            ("Content-Length", str(len(body))),
        ]
        if status == 401:
            headers.append(("WWW-Authenticate", 'Bearer realm="triage-node", Basic'))
        if status >= 400 and status != 409:
            headers.append(("Connection", "close"))  # the body was not (all) read: do not drain it
        start_response(f"{status} {HTTPStatus(status).phrase}", headers)
        return [body]

    def _handle(self, environ: Environ) -> tuple[int, bytes]:
        peer = str(environ.get("REMOTE_ADDR", ""))
        if not self.allowed.allows(peer):
            self._refused(peer, "address not allowed")
            return 403, _error("this address may not store here")
        path = str(environ.get("PATH_INFO", ""))
        if not path.startswith(self.base_path + "/"):
            return 404, _error("no such resource")
        match = _STUDIES.match(path[len(self.base_path) :])
        if match is None:
            return 404, _error("no such resource")
        if environ.get("REQUEST_METHOD") != "POST":
            return 405, _error("only POST (STOW-RS) is served here")
        principal = self.credentials.check(environ.get("HTTP_AUTHORIZATION"))
        verified = environ.get("SSL_CLIENT_VERIFY") == "SUCCESS"
        if principal is None and self.client_certificates and verified:
            # the TLS handshake required a certificate from the configured CA
            principal = Principal("certificate", str(environ.get("SSL_CLIENT_S_DN_CN", "-")))
        if principal is None:
            self._refused(peer, "no or wrong credentials")
            return 401, _error("credentials required")
        study = match.group("study")
        if study is not None and not is_valid_uid(study):
            return 400, _error("the Study Instance UID in the path is not a UID")
        boundary, problem = _boundary(str(environ.get("CONTENT_TYPE", "")))
        if boundary is None:
            return 415, _error(problem)
        length = _content_length(environ)
        if length is not None and length > self.max_request_bytes:
            self._refused(peer, f"request of {length} bytes over the limit")
            return 413, _error(f"request over {self.max_request_bytes} bytes")
        return self._store_request(environ, boundary, study, length, peer, principal)

    # -- the request ------------------------------------------------------------------------

    def _store_request(
        self,
        environ: Environ,
        boundary: bytes,
        study: str | None,
        length: int | None,
        peer: str,
        principal: Principal,
    ) -> tuple[int, bytes]:
        started = time.perf_counter()
        try:
            association_id = self.intake.open_association(
                calling_ae=CALLING_AE,
                called_ae=self.called_ae,
                peer_address=peer,
                now=self.storer.clock(),
            )
        except DatabaseUnavailable:
            return 503, _error("database unavailable; try again later")
        outcomes: list[_Outcome] = []
        how = AssociationEnd.ABORTED
        try:
            complete = self._parse(
                environ["wsgi.input"], boundary, length, study, outcomes, association_id
            )
            how = AssociationEnd.RELEASED
        except _TooLarge:
            self._refused(peer, "request body over the limit")
            return 413, _error(f"request over {self.max_request_bytes} bytes")
        finally:
            with contextlib.suppress(DatabaseUnavailable):
                self.intake.close_association(association_id, how, self.storer.clock())
            if self.on_request_end is not None and any(o.code == SUCCESS for o in outcomes):
                self.on_request_end()
        if not complete and not outcomes:
            return 400, _error("the body is not a complete multipart/related message")
        stored = sum(o.code == SUCCESS for o in outcomes)
        log_event(
            LOG,
            logging.INFO,
            "stow_request",
            "STOW-RS request",
            association=association_id,
            peer=peer,
            principal=f"{principal.kind}:{principal.name}",
            stored=stored,
            failed=len(outcomes) - stored,
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        status = 200 if stored == len(outcomes) and outcomes else 202 if stored else 409
        return status, self._response(outcomes)

    def _parse(
        self,
        stream: Any,
        boundary: bytes,
        length: int | None,
        study: str | None,
        outcomes: list[_Outcome],
        association_id: int | None,
    ) -> bool:
        """Feed the body to the parser, storing each part as it ends; True when the multipart
        message ended properly."""
        state: dict[str, Any] = {"part": None, "field": b"", "value": b"", "done": False}

        def begin() -> None:
            state["part"] = self._new_part()

        def header_field(data: bytes, start: int, end: int) -> None:
            state["field"] += data[start:end]

        def header_value(data: bytes, start: int, end: int) -> None:
            state["value"] += data[start:end]

        def header_end() -> None:
            part: _Part = state["part"]
            name = state["field"].decode("latin-1").strip().lower()
            part.headers[name] = state["value"].decode("latin-1").strip()
            state["field"] = state["value"] = b""

        def data(chunk: bytes, start: int, end: int) -> None:
            state["part"].file.write(chunk[start:end])

        def end() -> None:
            part: _Part = state["part"]
            state["part"] = None
            part.file.close()
            try:
                outcomes.append(self._store_part(part, study, association_id))
            finally:
                with contextlib.suppress(FileNotFoundError):
                    part.path.unlink()

        def finished() -> None:
            state["done"] = True

        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": begin,
                "on_header_field": header_field,
                "on_header_value": header_value,
                "on_header_end": header_end,
                "on_part_data": data,
                "on_part_end": end,
                "on_end": finished,
            },
        )
        received = 0
        try:
            while length is None or received < length:
                chunk = stream.read(CHUNK if length is None else min(CHUNK, length - received))
                if not chunk:
                    break
                received += len(chunk)
                if received > self.max_request_bytes:
                    raise _TooLarge
                parser.write(chunk)
            parser.finalize()
        except _TooLarge:
            raise
        except Exception as exc:  # a malformed body: what was stored stays stored
            log_event(
                LOG, logging.WARNING, "stow_malformed", f"malformed multipart body: {exc}"[:200]
            )
        finally:
            part = state["part"]
            if part is not None:  # cut off mid-part: nothing of it is kept
                part.file.close()
                with contextlib.suppress(FileNotFoundError):
                    part.path.unlink()
        return bool(state["done"])

    def _new_part(self) -> _Part:
        with self._lock:
            self._counter += 1
            number = self._counter
        path = self.incoming / f"stow-{os.getpid()}-{threading.get_ident()}-{number}.dcm"
        return _Part(path, open(path, "wb"))

    def _store_part(self, part: _Part, study: str | None, association_id: int | None) -> _Outcome:
        media, _ = parse_options_header(part.headers.get("content-type", "application/dicom"))
        if media.decode("latin-1").lower() != "application/dicom":
            return _Outcome(CANNOT_UNDERSTAND, f"part of type {media.decode('latin-1')!r}")

        def in_study(header: InstanceHeader) -> tuple[int, str] | None:
            if study is not None and header.study_uid != study:
                return STUDY_UID_MISMATCH, "Study Instance UID differs from the request's"
            return None

        try:
            stored: Stored = self.storer.store(part.path, association_id, in_study, whole=True)
        except Exception:  # a bug: this instance failed, the others may not
            LOG.exception("storing a STOW-RS part failed", extra={"action": "store_failed"})
            stored = Stored(PROCESSING_FAILURE, "internal error; see the node's log")
        header = stored.header
        return _Outcome(
            stored.code,
            stored.comment,
            header.sop_class_uid if header else "",
            header.sop_instance_uid if header else "",
        )

    # -- helpers ----------------------------------------------------------------------------

    def _refused(self, peer: str, reason: str) -> None:
        log_event(LOG, logging.WARNING, "stow_refused", f"STOW-RS refused: {reason}", peer=peer)

    def _response(self, outcomes: list[_Outcome]) -> bytes:
        """The Store Instances Response Module (PS3.18 10.5.3.2) as JSON. No Retrieve URL: the
        node offers no retrieve service (WADO-RS) for what it received."""
        ds = Dataset()
        referenced, failed = [], []
        for outcome in outcomes:
            item = Dataset()
            if outcome.sop_class_uid:
                item.ReferencedSOPClassUID = UID(outcome.sop_class_uid)
            if outcome.sop_instance_uid:
                item.ReferencedSOPInstanceUID = UID(outcome.sop_instance_uid)
            if outcome.code == SUCCESS:
                referenced.append(item)
            else:
                item.FailureReason = outcome.code
                failed.append(item)
        if referenced:
            ds.ReferencedSOPSequence = referenced
        if failed:
            ds.FailedSOPSequence = failed
        return ds.to_json().encode()


def _error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def _boundary(content_type: str) -> tuple[bytes | None, str]:
    media, options = parse_options_header(content_type)
    if media.decode("latin-1").lower() != "multipart/related":
        return None, 'the body must be multipart/related; type="application/dicom"'
    kind = options.get(b"type", b"application/dicom").decode("latin-1").lower()
    if kind != "application/dicom":
        return None, f"only application/dicom parts are accepted, not {kind!r}"
    boundary = options.get(b"boundary")
    if not boundary:
        return None, "multipart/related without a boundary"
    return boundary, ""


def _content_length(environ: Environ) -> int | None:
    try:
        value = int(environ.get("CONTENT_LENGTH") or -1)
    except ValueError:
        return None
    return value if value >= 0 else None
