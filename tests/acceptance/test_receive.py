"""DCMTK against the installed ``triage-node serve``: C-ECHO, C-STORE, refusals, durability;
each test on both DICOM transports (``dicom.transport``: pynetdicom and DCMTK)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, _config
from sqlalchemy import create_engine, text

from tests.support.node import Node, process_group_members
from tests.support.onnx_models import write_model_dir
from tests.support.pdus import CONTEXT_ID_OFFSET, association_request
from tests.support.peers import (
    STORESCU_PROPOSE,
    TRANSPORTS,
    StoreSCP,
    dataset_bytes,
    dcmtk_env,
    require_shared_dicom,
    require_tool,
    storescu,
    transfer_syntax_of,
    transport_settings,
    wait_for,
)
from tests.support.synth import write_study_set
from triage_node.domain import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    is_valid_uid,
)


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def node(tmp_path: Path, transport: str) -> Iterator[Node]:
    """A running triage-node on *transport*, stopped with SIGTERM (and checked) afterwards."""
    running = Node(tmp_path, dicom=transport_settings(transport)).start()
    yield running
    if running.process is not None:
        assert running.stop() == 0, running.log()


def sendable_shared_files() -> list[Path]:
    """Shared files with a valid File Meta header (Transfer Syntax UID present)."""
    directory = require_shared_dicom()
    files = []
    for path in sorted(directory.glob("*.dcm")):
        try:
            meta = dcmread(path, stop_before_pixels=True).file_meta
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if "TransferSyntaxUID" in meta and "MediaStorageSOPInstanceUID" in meta:
            files.append(path)
    return files


def uids_valid(path: Path) -> bool:
    ds = dcmread(path, stop_before_pixels=True)
    keys = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
    return all(is_valid_uid(str(ds.get(k, ""))) for k in keys)


def propose_flag(path: Path) -> str:
    return STORESCU_PROPOSE[transfer_syntax_of(path)]


def send_raw(port: int, path: Path) -> int:
    """C-STORE a file's dataset bytes as they are, with pynetdicom's chunked sender."""
    meta = dcmread(path, stop_before_pixels=True).file_meta
    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE_NODE")
        assert assoc.is_established
        status = assoc.send_c_store(path)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    return int(status.Status)


def query(node: Node, sql: str, **params: object) -> list[tuple]:
    engine = create_engine(node.database_url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params)]
    finally:
        engine.dispose()


def echoscu(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("echoscu", "dcmtk"), "-v", *args, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
        env=dcmtk_env(),
        check=False,
    )


REJECTED_FOR_A_SLOT = "Local Limit Exceeded"  # how echoscu reports A-ASSOCIATE-RJ (2, 3, 2)


def echo_once_slots_free(port: int, within: float = 20.0) -> subprocess.CompletedProcess[str]:
    """echoscu, tried again while the node turns it away for want of a slot, for *within*
    seconds. A slot that a closed connection's thread has yet to give back (the accept loop
    may take the next connection first on a busy machine) is not held; one that stays taken
    until a timeout (set far beyond *within* by the caller) is, and fails the test."""
    deadline = time.monotonic() + within
    while True:
        result = echoscu(port, "-aec", "TRIAGE_NODE")
        busy = REJECTED_FOR_A_SLOT in result.stdout + result.stderr
        if result.returncode == 0 or not busy or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


def wait_for_release_recorded(node: Node, calling_ae: str) -> None:
    """The one association from *calling_ae* recorded as released."""
    sql = "select end_reason from associations where calling_ae = :ae"
    wait_for(
        lambda: query(node, sql, ae=calling_ae) == [("RELEASED",)],
        10,
        what=f"the release of {calling_ae}'s association to be recorded",
    )


def test_echoscu(node: Node) -> None:
    result = echoscu(node.port, "-aec", "TRIAGE_NODE")
    assert result.returncode == 0, result.stderr
    # echoscu releases its association, and closes the connection at once: recorded as released
    wait_for_release_recorded(node, "ECHOSCU")


def test_every_shared_file_is_stored_byte_identical(node: Node, tmp_path: Path) -> None:
    """Each file goes in its own transfer syntax to the node and to DCMTK's storescp in
    bit-preserving mode; the node must keep exactly the bytes storescp received.

    (DCMTK re-encodes some files on sending, e.g. undefined-length sequences, so the
    reference for "what was sent" is a bit-preserving receiver, not the source file.)
    """
    files = sendable_shared_files()
    assert len(files) >= 20
    reference = StoreSCP(tmp_path / "storescp", "+B", "+xa")
    unreadable_by_dcmtk = []
    try:
        for path in files:
            sent = storescu(reference.port, [path], propose_flag(path), called="ANY")
            if "Bad DICOM file" in sent.stderr + sent.stdout:
                unreadable_by_dcmtk.append(path)  # DCMTK will not even send it
                continue
            assert sent.returncode == 0, f"storescp refused {path.name}: {sent.stderr}"
    finally:
        reference.stop()
    received = {
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
        for p in (tmp_path / "storescp").iterdir()
    }
    assert len(unreadable_by_dcmtk) <= 2, unreadable_by_dcmtk
    refused_invalid_uids: list[str] = []
    for path in files:
        sop_uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        if not uids_valid(path):
            # e.g. edge_invalid_sequence_UN: its "UIDs" are SHA-256 hex strings. The node never
            # puts such a value in a path: a clear Cannot Understand instead of a success.
            result = storescu(node.port, [path], propose_flag(path))
            output = result.stdout + result.stderr
            assert "Received Store Response (Error: CannotUnderstand)" in output, output
            assert (
                query(node, "select 1 from instances where sop_instance_uid = :u", u=sop_uid) == []
            )
            refused_invalid_uids.append(path.name)
            continue
        if path in unreadable_by_dcmtk:
            # pynetdicom's chunked sender streams the file's dataset bytes unchanged.
            status = send_raw(node.port, path)
            assert status == 0x0000, f"{path.name}: 0x{status:04X}"
            expected = dataset_bytes(path)
        else:
            result = storescu(node.port, [path], propose_flag(path))
            output = result.stdout + result.stderr
            assert result.returncode == 0, f"{path.name}: {output}"
            assert "Received Store Response (Success)" in output, f"{path.name}: {output}"
            expected = dataset_bytes(received[sop_uid])
        [(relpath, stored_syntax)] = query(
            node,
            "select path, transfer_syntax_uid from instances where sop_instance_uid = :u",
            u=sop_uid,
        )
        assert stored_syntax == transfer_syntax_of(path), path.name
        assert dataset_bytes(node.spool / relpath) == expected, path.name
    assert len(refused_invalid_uids) <= 1, refused_invalid_uids
    wait_for(
        lambda: not query(node, "select 1 from studies where state = 'RECEIVED'"),
        timeout=20,
        what="every study to be queued",
    )


def test_the_node_names_itself_on_the_wire_and_in_its_files(node: Node, tmp_path: Path) -> None:
    """storescu hears the node's Implementation Class UID and Version Name in the
    A-ASSOCIATE-AC, and the spooled file's File Meta names the node as its writer."""
    [file] = write_study_set(tmp_path / "set", 1, 32, 32, per_study=1)
    result = storescu(node.port, [file], "-d")
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert f"Their Implementation Class UID:    {IMPLEMENTATION_CLASS_UID}" in output, output
    assert f"Their Implementation Version Name: {IMPLEMENTATION_VERSION_NAME}" in output
    [spooled] = [p for p in node.spool.rglob("*.dcm") if "incoming" not in p.parts]
    meta = dcmread(spooled, stop_before_pixels=True).file_meta
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME


def test_an_idle_association_is_released_and_recorded(tmp_path: Path, transport: str) -> None:
    """After ``dicom.network_timeout`` without a message the node releases the association
    (A-RELEASE-RQ, not A-ABORT: a PACS may count an abort as a failed transfer)."""
    node = Node(tmp_path, dicom={**transport_settings(transport), "network_timeout": 2}).start()
    try:
        ae = AE(ae_title="QUIET")
        ae.add_requested_context("1.2.840.10008.1.1")
        ae.network_timeout = None  # only the node ends it
        assoc = ae.associate("127.0.0.1", node.port, ae_title="TRIAGE_NODE")
        assert assoc.is_established
        wait_for(lambda: not assoc.is_alive(), 30, what="the node to end the idle association")
        assert assoc.is_released and not assoc.is_aborted
        wait_for_release_recorded(node, "QUIET")
    finally:
        assert node.stop() == 0


def dcmtk_programs(node: Node) -> list[int]:
    """The pids of the node's DCMTK transport programs."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        program, arguments = command[0], b" ".join(command[1:])
        ours = str(node.spool / "incoming").encode() in arguments
        if entry.name.isdigit() and b"/dcmtk-receiver-" in program and ours:
            pids.append(int(entry.name))
    return pids


def test_a_dcmtk_program_that_dies_is_restarted_with_its_receiver(tmp_path: Path) -> None:
    node = Node(tmp_path, dicom=transport_settings("dcmtk")).start()
    try:
        wait_for(lambda: len(dcmtk_programs(node)) == 2, 60, what="one program per receiver")
        os.kill(dcmtk_programs(node)[0], signal.SIGKILL)
        wait_for(
            lambda: any(r.get("action") == "receiver_died" for r in node.log_records()),
            30,
            what="the receiver to exit and be noticed",
        )
        wait_for(lambda: len(dcmtk_programs(node)) == 2, 60, what="a new DCMTK program")
        [file] = write_study_set(tmp_path / "set", 1, 32, 32)
        for _ in range(4):  # both receivers take connections again
            assert storescu(node.port, [file]).returncode == 0
    finally:
        assert node.stop() == 0
    died = [r for r in node.log_records() if r.get("action") == "dcmtk_receiver_died"]
    assert len(died) == 1


def test_killing_the_supervisor_alone_takes_every_process_of_the_node(
    tmp_path: Path, transport: str
) -> None:
    """The supervisor SIGKILLed, nothing else: its fork server, receivers (and their DCMTK
    programs) and worker die with it, and nothing is left accepting on the DICOM port."""
    model = write_model_dir(tmp_path / "model")
    node = Node(
        tmp_path / "node",
        dicom=transport_settings(transport),
        worker={"count": 1, "model_dir": str(model)},
    ).start()
    assert node.process is not None
    group = node.process.pid  # the node runs in its own session and process group
    wait_for(
        lambda: len(process_group_members(group)) >= 5, 30, what="supervisor, fork server, children"
    )
    os.kill(node.process.pid, signal.SIGKILL)
    node.process.wait(30)
    node.process = None
    wait_for(
        lambda: process_group_members(group) == [], 30, what="every process of the node to end"
    )
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", node.port), timeout=5).close()


def test_resend_is_idempotent_and_study_is_queued_once(node: Node, tmp_path: Path) -> None:
    files = write_study_set(tmp_path / "set", 4, 64, 64, per_study=4)
    assert storescu(node.port, files).returncode == 0
    wait_for(lambda: query(node, "select count(*) from jobs")[0][0] == 1, 20, what="a job")
    assert storescu(node.port, files[:1]).returncode == 0  # a late resend of one image
    wait_for(
        lambda: (
            sorted(query(node, "select state, count(*) from jobs group by state"))
            == [("QUEUED", 1), ("SUPERSEDED", 1)]
        ),
        20,
        what="the re-opened study to be queued again",
    )
    assert query(node, "select count(*), max(revision) from studies") == [(1, 2)]
    assert query(node, "select count(*) from instances") == [(4,)]


def test_not_allowed_calling_ae_is_rejected(tmp_path: Path, transport: str) -> None:
    dicom = {**transport_settings(transport), "allowed_calling_aes": ["PACS1"]}
    node = Node(tmp_path, dicom=dicom).start(expect_echo=False)
    try:
        refused = echoscu(node.port, "-aet", "INTRUDER", "-aec", "TRIAGE_NODE")
        assert refused.returncode != 0
        assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
        allowed = echoscu(node.port, "-aet", "PACS1", "-aec", "TRIAGE_NODE")
        assert allowed.returncode == 0, allowed.stdout + allowed.stderr
        wrong_called = echoscu(node.port, "-aet", "PACS1", "-aec", "SOMEONE_ELSE")
        assert "Called AE Title Not Recognized" in wrong_called.stdout + wrong_called.stderr
    finally:
        assert node.stop() == 0
    rejected = [r for r in node.log_records() if r.get("action") == "association_rejected"]
    reasons = {r["calling_ae"]: r["message"] for r in rejected}
    assert reasons["INTRUDER"].endswith("calling AE title not allowed")
    assert reasons["PACS1"].endswith("called AE title is not this node's")


def test_source_address_allow_list(tmp_path: Path, transport: str) -> None:
    dicom = {**transport_settings(transport), "allowed_networks": ["10.99.0.0/16"]}
    node = Node(tmp_path, dicom=dicom).start(expect_echo=False)
    try:
        refused = echoscu(node.port, "-aec", "TRIAGE_NODE")
        assert refused.returncode != 0
        assert "Association Rejected" in refused.stdout + refused.stderr
    finally:
        assert node.stop() == 0
    rejected = [r for r in node.log_records() if r.get("action") == "association_rejected"]
    assert rejected and rejected[0]["peer"] == "127.0.0.1"
    assert "source address not allowed" in rejected[0]["message"]


def test_disk_guard_answers_a700_and_leaves_nothing(tmp_path: Path, transport: str) -> None:
    dicom = transport_settings(transport)
    node = Node(tmp_path, dicom=dicom, storage={"min_free_mb": 2**30}).start()  # 1 PiB: never
    try:
        files = write_study_set(tmp_path / "set", 2, 64, 64)
        result = storescu(node.port, files)
        output = result.stdout + result.stderr
        assert "Received Store Response (Refused: OutOfResources)" in output, output
        assert "Success" not in output
        assert query(node, "select count(*) from instances") == [(0,)]
        leftovers = [p for p in node.spool.rglob("*") if p.is_file()]
        assert leftovers == []
    finally:
        assert node.stop() == 0


def test_unreadable_dataset_gets_c000_and_service_keeps_running(node: Node, tmp_path: Path) -> None:
    [good] = write_study_set(tmp_path / "set", 1, 32, 32)
    data = bytearray(good.read_bytes())
    broken = tmp_path / "broken.dcm"
    # Keep the File Meta, then replace the dataset with an element whose length runs past the
    # end (the dataset of even length, as DICOM's are: DCMTK aborts on an odd fragment).
    meta_end = 144 + int.from_bytes(data[140:144], "little")
    broken.write_bytes(bytes(data[:meta_end]) + b"\x08\x00\x16\x00UI\xff\x7f1.2.34")
    ae = AE(ae_title="FUZZ")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.1.2.1")
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", node.port, ae_title="TRIAGE_NODE")
        assert assoc.is_established
        status = assoc.send_c_store(broken)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert 0xC000 <= status.Status <= 0xCFFF, hex(status.Status)
    assert status.ErrorComment
    assert storescu(node.port, [good]).returncode == 0  # still serving
    refused = [r for r in node.log_records() if r.get("action") == "instance_refused"]
    assert refused and refused[0]["status"].startswith("0xC")


@pytest.mark.parametrize("receivers", [1])
def test_sigterm_finishes_and_exits_cleanly(tmp_path: Path, receivers: int, transport: str) -> None:
    node = Node(tmp_path, dicom={**transport_settings(transport), "receivers": receivers}).start()
    files = write_study_set(tmp_path / "set", 8, 256, 256)
    assert storescu(node.port, files).returncode == 0
    assert node.stop() == 0
    actions = [r.get("action") for r in node.log_records()]
    assert "service_stopped" in actions and "receiver_stopped" in actions
    assert query(node, "select count(*) from instances") == [(8,)]


def test_bare_tcp_connections_do_not_hold_association_slots(tmp_path: Path, transport: str) -> None:
    """Load-balancer checks and port scans open and close TCP without a request. (A slot kept
    until the request deadline, set to a minute here, would fail the test.)"""
    dicom = {
        **transport_settings(transport),
        "max_associations": 2,
        "receivers": 1,
        "request_timeout": 60.0,
    }
    node = Node(tmp_path, dicom=dicom).start()
    try:
        for _ in range(10):
            socket.create_connection(("127.0.0.1", node.port), timeout=2).close()
        result = echo_once_slots_free(node.port)
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        assert node.stop() == 0


@pytest.mark.parametrize(
    "payload",
    [
        b"\x02\x00\x00\x00\x00\x04\x00\x00\x00\x00",  # an A-ASSOCIATE-AC, sent to the acceptor
        b"\x01\x00\x00\x00\x00\x44\x00\x01\x00\x00",  # an A-ASSOCIATE-RQ cut short
        b"\x01\x00\x00\x00\x00\x02\xff\xff",  # a request too short to be one
        # presentation context ID 0: pynetdicom's state machine dies on it, silently
        (lambda r: r[:CONTEXT_ID_OFFSET] + b"\x00" + r[CONTEXT_ID_OFFSET + 1 :])(
            association_request()
        ),
    ],
    ids=["wrong-pdu", "cut-short", "too-short", "context-id-0"],
)
def test_broken_requests_do_not_hold_association_slots(
    tmp_path: Path, payload: bytes, transport: str
) -> None:
    """pynetdicom answers A-ABORT (or its state machine dies) and would then wait the whole
    ACSE timeout for a request that never comes, holding a slot: ten such connections must not
    lock the PACS out. (The timeouts are set to minutes here, so a slot held until one of them
    fails the test.)"""
    dicom = {
        **transport_settings(transport),
        "max_associations": 2,
        "receivers": 1,
        "request_timeout": 60.0,
        "acse_timeout": 120.0,
    }
    node = Node(tmp_path, dicom=dicom).start()
    try:
        for _ in range(10):
            with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(4096):  # until the node closes
                    pass
        result = echo_once_slots_free(node.port)
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        assert node.stop() == 0
