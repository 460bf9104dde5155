"""STOW-RS into the installed node (PS3.18 10.5): curl and dicomweb-client as clients.

Every shared radiograph is stored byte-identical; a wrong token stores nothing; a part of
another study, a truncated part and a non-DICOM part each fail on their own with their PS3.18
reason; a request over the size limit gets 413 before its body is read; the study is queued
once the request has ended, as after an association.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import random
import shutil
import socket
import subprocess
import threading
import uuid
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from requests.exceptions import HTTPError
from sqlalchemy import create_engine, text

from tests.acceptance.test_receive import sendable_shared_files, uids_valid
from tests.support.node import Node
from tests.support.peers import free_port, require_shared_dicom, wait_for
from tests.support.pki import make_pki
from tests.support.synth import write_study_set
from triage_node.credentials import hash_secret

TOKEN = "a-token-for-the-pacs"
PASSWORD = "radiology-password"
TRUNCATED = "edge_truncated_PixelData.dcm"  # the shared file cut inside Pixel Data
FAILED_SOP, REFERENCED_SOP, FAILURE_REASON = "00081198", "00081199", "00081197"
SOP_INSTANCE = "00081155"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> object:
    web_port = free_port()
    node = Node(
        tmp_path_factory.mktemp("stow"),
        dicomweb={
            "port": web_port,
            "bind": "127.0.0.1",
            "tokens": [hash_secret(TOKEN, iterations=10_000)],
            "users": [f"radiology:{hash_secret(PASSWORD, iterations=10_000)}"],
            "max_request_mb": 64,
        },
    ).start()
    node.web_port = web_port  # type: ignore[attr-defined]
    yield node
    assert node.stop() == 0


def url(node: Node, path: str = "/studies") -> str:
    return f"http://127.0.0.1:{node.web_port}/dicom-web{path}"  # type: ignore[attr-defined]


def multipart(parts: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/related body of (content type, bytes) parts and its Content-Type."""
    boundary = uuid.uuid4().hex
    body = b""
    for content_type, data in parts:
        body += f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def curl(
    node: Node, body: bytes, content_type: str, tmp_path: Path, *auth: str, path: str = "/studies"
) -> tuple[int, dict[str, object]]:
    """POST *body* with curl; (HTTP status, the JSON response)."""
    (tmp_path / "body").write_bytes(body)
    result = subprocess.run(
        [
            shutil.which("curl") or pytest.skip("curl is not available (apt-get install curl)"),
            "-sS",
            "-o",
            str(tmp_path / "response"),
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            "-H",
            f"Content-Type: {content_type}",
            *auth,
            "--data-binary",
            f"@{tmp_path / 'body'}",
            url(node, path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    response = (tmp_path / "response").read_bytes()
    return int(result.stdout), json.loads(response) if response else {}


def bearer(token: str = TOKEN) -> tuple[str, str]:
    return ("-H", f"Authorization: Bearer {token}")


def rows(node: Node, sql: str, **params: str) -> list[tuple[object, ...]]:
    engine = create_engine(node.database_url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params)]
    finally:
        engine.dispose()


def spooled(node: Node, sop_instance_uid: str) -> Path | None:
    found = [p for p in node.spool.rglob(f"{sop_instance_uid}.dcm") if "incoming" not in p.parts]
    return found[0] if found else None


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def failures(response: dict[str, object]) -> list[int]:
    items = response.get(FAILED_SOP, {}).get("Value", [])  # type: ignore[union-attr]
    return [item[FAILURE_REASON]["Value"][0] for item in items]


def stored_uids(response: dict[str, object]) -> list[str]:
    items = response.get(REFERENCED_SOP, {}).get("Value", [])  # type: ignore[union-attr]
    return [item[SOP_INSTANCE]["Value"][0] for item in items]


def test_curl_stores_every_shared_radiograph_byte_identical(node: Node, tmp_path: Path) -> None:
    """All in one request: each whole file is stored as sent; the truncated one (which C-STORE's
    framing cannot tell) fails alone, with "cannot understand"."""
    files = [f for f in sendable_shared_files() if uids_valid(f) and f.name != TRUNCATED]
    broken = require_shared_dicom() / TRUNCATED
    assert files and broken.is_file()
    parts = [("application/dicom", f.read_bytes()) for f in [*files, broken]]
    body, content_type = multipart(parts)
    status, response = curl(node, body, content_type, tmp_path, *bearer())
    assert status == 202, response
    assert len(stored_uids(response)) == len(files) and failures(response) == [0xC000]
    # The truncated file is a cut copy of a whole one (same SOP Instance UID), sent after it:
    # the whole file's bytes, checked below, show that it replaced nothing.
    for f in files:
        path = spooled(node, sop_uid(f))
        assert path is not None and path.read_bytes() == f.read_bytes(), f.name


def test_dicomweb_client_stores_every_shared_radiograph_as_it_sent_it(
    node: Node, tmp_path: Path
) -> None:
    """dicomweb-client encodes each dataset itself (pydicom.dcmwrite); the node keeps exactly
    those bytes. (After the curl test: the same instances, sent again, replace its copies.)"""
    files = [f for f in sendable_shared_files() if uids_valid(f) and f.name != TRUNCATED]
    datasets = [pydicom.dcmread(f) for f in files]
    client = DICOMwebClient(url(node, ""), headers={"Authorization": f"Bearer {TOKEN}"})
    response = client.store_instances(datasets)
    assert len(response.ReferencedSOPSequence) == len(files)
    assert "FailedSOPSequence" not in response
    for dataset in datasets:
        sent = io.BytesIO()
        pydicom.dcmwrite(sent, dataset)  # what dicomweb-client put in the part
        path = spooled(node, str(dataset.SOPInstanceUID))
        assert path is not None and path.read_bytes() == sent.getvalue()


def test_dicomweb_client_with_basic_auth_and_the_study_is_queued(
    node: Node, tmp_path: Path
) -> None:
    files = write_study_set(tmp_path / "set", 3, 64, 64, per_study=3)
    datasets = [pydicom.dcmread(f) for f in files]
    study = str(datasets[0].StudyInstanceUID)
    client = DICOMwebClient(
        url(node, ""),
        headers={
            "Authorization": "Basic " + base64.b64encode(f"radiology:{PASSWORD}".encode()).decode()
        },
    )
    response = client.store_instances(datasets, study_instance_uid=study)
    assert len(response.ReferencedSOPSequence) == 3 and "FailedSOPSequence" not in response
    wait_for(
        lambda: (
            rows(node, "select state from studies where study_uid = :s", s=study) == [("QUEUED",)]
        ),
        30,
        what="the study to settle and be queued after the request",
    )
    [(calling, ended)] = rows(
        node,
        "select a.calling_ae, a.end_reason from associations a join instances i "
        "on i.association_id = a.id join studies s on s.id = i.study_id "
        "where s.study_uid = :s group by a.id, a.calling_ae, a.end_reason",
        s=study,
    )
    assert calling == "STOW-RS" and ended == "RELEASED"


def test_wrong_or_missing_credentials_get_401_and_store_nothing(node: Node, tmp_path: Path) -> None:
    [file] = write_study_set(tmp_path / "set", 1, 32, 32, per_study=1)
    uid = str(pydicom.dcmread(file).SOPInstanceUID)
    body, content_type = multipart([("application/dicom", file.read_bytes())])
    for auth in (bearer("not-the-token"), (), ("-u", "radiology:Bad-Passw0rd")):
        status, _ = curl(node, body, content_type, tmp_path, *auth)
        assert status == 401
    assert spooled(node, uid) is None
    assert rows(node, "select count(*) from instances where sop_instance_uid = :u", u=uid) == [(0,)]
    refused = [r for r in node.log_records() if r.get("action") == "stow_refused"]
    logged = json.dumps(refused)
    assert refused and "not-the-token" not in logged and "Bad-Passw0rd" not in logged


def test_each_bad_part_fails_alone_with_its_reason(node: Node, tmp_path: Path) -> None:
    good, other_study, truncated = write_study_set(tmp_path / "set", 3, 64, 64, per_study=1)
    target = str(pydicom.dcmread(good).StudyInstanceUID)
    parts = [
        ("application/dicom", good.read_bytes()),
        ("application/dicom", other_study.read_bytes()),  # another study than the URL's
        ("application/dicom", truncated.read_bytes()[:-100]),  # cut inside Pixel Data
        ("application/dicom", b"this is not DICOM at all"),
    ]
    body, content_type = multipart(parts)
    status, response = curl(
        node, body, content_type, tmp_path, *bearer(), path=f"/studies/{target}"
    )
    assert status == 202, response
    assert stored_uids(response) == [str(pydicom.dcmread(good).SOPInstanceUID)]
    assert failures(response) == [0xA900, 0xC000, 0xC000]
    for bad in (other_study, truncated):
        assert (
            spooled(node, str(pydicom.dcmread(bad, stop_before_pixels=True).SOPInstanceUID)) is None
        )
    # none stored at all: 409
    body, content_type = multipart([("application/dicom", other_study.read_bytes())])
    status, response = curl(
        node, body, content_type, tmp_path, *bearer(), path=f"/studies/{target}"
    )
    assert status == 409 and failures(response) == [0xA900]
    assert not list((node.spool / "incoming").rglob("stow-*"))  # nothing partial left


def announce(node: Node, token: str, length: int) -> str:
    """Send the head of a STOW-RS request announcing *length* bytes, and a first boundary;
    the first answer the node gives, without the body being sent."""
    boundary = "b" * 16
    head = (
        "POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {token}\r\n"
        f'Content-Type: multipart/related; type="application/dicom"; boundary={boundary}\r\n'
        f"Content-Length: {length}\r\n\r\n"
    )
    port = node.web_port  # type: ignore[attr-defined]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode() + f"--{boundary}\r\n".encode())
        return sock.recv(4096).decode("latin-1")


def test_a_request_over_the_limit_gets_413_before_its_body(node: Node) -> None:
    """A client announcing 2 GB is answered at once, without sending the body; so is one with
    a wrong token, and the node does not wait to drain what it refused."""
    answer = announce(node, TOKEN, 2 * 2**30)
    assert answer.startswith("HTTP/1.1 413") and "Connection: close" in answer, answer[:300]
    answer = announce(node, "not-the-token", 2 * 2**30)
    assert answer.startswith("HTTP/1.1 401") and "Connection: close" in answer, answer[:300]


def test_other_media_types_methods_and_paths_are_refused(node: Node, tmp_path: Path) -> None:
    status, _ = curl(node, b"{}", "application/json", tmp_path, *bearer())
    assert status == 415
    status, _ = curl(
        node, b"x", "multipart/related; boundary=x", tmp_path, *bearer(), path="/series"
    )
    assert status == 404
    with pytest.raises(HTTPError, match="405"):
        DICOMwebClient(
            url(node, ""), headers={"Authorization": f"Bearer {TOKEN}"}
        ).search_for_studies()


class Upload:
    """One STOW-RS request in a thread; *answer* once its response came (if it does)."""

    def __init__(self, node: Node, body: bytes, content_type: str) -> None:
        self.answer: requests.Response | None = None
        headers = {"Content-Type": content_type, "Authorization": f"Bearer {TOKEN}"}
        self.thread = threading.Thread(target=self._post, args=(url(node), body, headers))
        self.thread.start()

    def _post(self, address: str, body: bytes, headers: dict[str, str]) -> None:
        with contextlib.suppress(requests.RequestException):  # killed mid-request
            self.answer = requests.post(address, data=body, headers=headers, timeout=60)


def test_sigkill_during_stow_loses_nothing_the_response_reported(tmp_path: Path) -> None:
    """The crash test's discipline for STOW-RS: the service is SIGKILLed while a request streams
    in (after a seeded number of its instances were stored) or just after its response; what a
    response listed as stored is there, byte for byte, after the restart, and nothing partial
    is left."""
    rng = random.Random(20261201)
    web_port = free_port()
    node = Node(
        tmp_path / "node",
        dicomweb={
            "port": web_port,
            "bind": "127.0.0.1",
            "tokens": [hash_secret(TOKEN, iterations=10_000)],
        },
    ).start()
    node.web_port = web_port  # type: ignore[attr-defined]
    reported: dict[str, Path] = {}
    killed_mid_request = 0

    def stored_count() -> int:
        return int(node.sql("select count(*) as n from instances")[0]["n"])

    try:
        for round_number in range(6):
            files = write_study_set(tmp_path / f"r{round_number}", 8, 512, 512, per_study=8)
            body, content_type = multipart([("application/dicom", f.read_bytes()) for f in files])
            target = stored_count() + rng.randint(1, 7)
            upload = Upload(node, body, content_type)
            if round_number % 2:  # after the response
                wait_for(lambda u=upload: u.answer is not None, 60, what="the response")
            else:  # mid-request, after some of its instances were stored
                wait_for(lambda t=target: stored_count() >= t, 60, 0.005, what="the upload")
            node.kill()
            upload.thread.join(60)
            if upload.answer is None:
                killed_mid_request += 1
            else:
                assert upload.answer.status_code in (200, 202), upload.answer.text
                by_uid = {sop_uid(f): f for f in files}
                reported.update({uid: by_uid[uid] for uid in stored_uids(upload.answer.json())})
            node.start()
        assert reported and killed_mid_request >= 2, (len(reported), killed_mid_request)
        for uid, source in reported.items():
            [row] = node.sql("select path from instances where sop_instance_uid = :u", u=uid)
            assert (node.spool / row["path"]).read_bytes() == source.read_bytes()
        assert not [p for p in (node.spool / "incoming").rglob("*") if p.is_file()]
    finally:
        if node.process is not None:
            assert node.stop() == 0


def test_https_with_client_certificates_is_the_credential(tmp_path: Path) -> None:
    """dicomweb.tls_verify_client: a client certificate from the configured CA stores without a
    token; a certificate from another CA, or none, does not get through the handshake."""
    pki = make_pki(tmp_path / "pki")
    web_port = free_port()
    node = Node(
        tmp_path / "node",
        dicomweb={
            "port": web_port,
            "bind": "127.0.0.1",
            "tls_cert_file": str(pki["server"]),
            "tls_key_file": str(pki["server-key"]),
            "tls_ca_file": str(pki["ca"]),
            "tls_verify_client": True,
        },
    ).start()
    node.web_port = web_port  # type: ignore[attr-defined]
    https = f"https://127.0.0.1:{web_port}/dicom-web/studies"
    [file] = write_study_set(tmp_path / "set", 1, 32, 32, per_study=1)
    body, content_type = multipart([("application/dicom", file.read_bytes())])
    (tmp_path / "body").write_bytes(body)

    def post(*identity: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                shutil.which("curl") or pytest.skip("curl is not available (apt-get install curl)"),
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--cacert",
                str(pki["ca"]),
                *identity,
                "-H",
                f"Content-Type: {content_type}",
                "--data-binary",
                f"@{tmp_path / 'body'}",
                https,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    try:
        for refused in (post(), post("--cert", str(pki["rogue"]), "--key", str(pki["rogue-key"]))):
            assert refused.returncode != 0 or refused.stdout in ("000", "401"), refused
        assert spooled(node, sop_uid(file)) is None
        good = post("--cert", str(pki["client"]), "--key", str(pki["client-key"]))
        assert good.returncode == 0 and good.stdout == "200", good
        assert spooled(node, sop_uid(file)) is not None
        records = [r for r in node.log_records() if r.get("action") == "stow_request"]
        assert records[-1]["principal"] == "certificate:client"
    finally:
        assert node.stop() == 0
