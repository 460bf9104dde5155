"""Storing a received file (the C-STORE and STOW-RS promise) against a real database and spool:
what is on disk and in the database after a success and after each kind of failure."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import func, select

from tests.support.synth import write_study_set
from triage_node.db.database import Database
from triage_node.db.schema import associations, instances
from triage_node.dicom.status import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS
from triage_node.dicom.storage_scp import StorageHandlers
from triage_node.dicom.storing import Storer, read_header
from triage_node.domain import AssociationEnd, utcnow
from triage_node.spool import Spool


@pytest.fixture
def received(tmp_path: Path) -> list[Path]:
    return write_study_set(tmp_path / "set", 2, 64, 48, per_study=2)


def setup(store: Database, tmp_path: Path) -> tuple[Spool, Storer, int]:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    association = store.intake.open_association("PACS", "TRIAGE_NODE", "127.0.0.1", utcnow())
    return spool, Storer(spool, store.intake, 0, utcnow), association


def arrive(spool: Spool, source: Path) -> Path:
    """The file as the receiver streams it into its incoming directory."""
    partial = spool.incoming_dir() / f"partial-{source.name}"
    partial.write_bytes(source.read_bytes())
    return partial


def rows(store: Database) -> tuple[int, int]:
    """(instance rows, the association's instance count)."""
    with store.engine.connect() as conn:
        count = conn.execute(select(func.count()).select_from(instances)).scalar_one()
        counted = conn.execute(select(associations.c.instances)).scalar_one()
    return int(count), int(counted)


def file_fsyncs_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every fsync of a regular file by the spool's flusher threads fails with EIO."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        flusher = threading.current_thread().name.startswith("spool-fsync")
        if flusher and not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(5, os.strerror(5))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_success_means_file_and_row(store: Database, tmp_path: Path, received: list[Path]) -> None:
    spool, storer, association = setup(store, tmp_path)
    stored = storer.store(arrive(spool, received[0]), association, None)
    assert (stored.code, stored.comment) == (SUCCESS, "")
    assert stored.header is not None
    path = spool.path_of(Spool.relpath_for(stored.header))
    assert path.read_bytes() == received[0].read_bytes()
    assert rows(store) == (1, 1)
    assert not any(spool.incoming_dir().iterdir())


def test_a_file_that_cannot_be_made_durable_takes_its_new_row_back(
    store: Database, tmp_path: Path, received: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The row is recorded while the file is fsynced; when that fsync fails the sender gets
    Out of Resources and neither the file nor the row stays (nothing to hold the study back)."""
    spool, storer, association = setup(store, tmp_path)
    file_fsyncs_fail(monkeypatch)
    partial = arrive(spool, received[0])
    stored = storer.store(partial, association, None)
    assert stored.code == OUT_OF_RESOURCES
    assert stored.comment == "cannot write to the spool: Input/output error"
    assert rows(store) == (0, 0)
    assert not partial.exists()
    assert stored.header is not None
    assert not spool.path_of(Spool.relpath_for(stored.header)).exists()


def test_a_failed_resend_keeps_what_was_acknowledged(
    store: Database, tmp_path: Path, received: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, storer, association = setup(store, tmp_path)
    first = storer.store(arrive(spool, received[0]), association, None)
    assert first.code == SUCCESS and first.header is not None
    file_fsyncs_fail(monkeypatch)
    again = storer.store(arrive(spool, received[0]), association, None)
    assert again.code == OUT_OF_RESOURCES
    assert rows(store) == (1, 2)  # the row of the first, acknowledged copy stays
    assert spool.path_of(Spool.relpath_for(first.header)).read_bytes() == (received[0].read_bytes())


def test_a_failed_directory_fsync_after_the_rename_keeps_both_for_the_resend(
    store: Database, tmp_path: Path, received: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is whole at its place and its row committed, but its directory entry may not be
    durable: the sender is told to try again, and the resend replaces both."""
    spool, storer, association = setup(store, tmp_path)
    assert storer.store(arrive(spool, received[0]), association, None).code == SUCCESS

    def broken(path: Path) -> None:
        raise OSError(5, os.strerror(5))

    monkeypatch.setattr("triage_node.spool._fsync_dir", broken)  # (its series directory exists)
    stored = storer.store(arrive(spool, received[1]), association, None)
    assert stored.code == OUT_OF_RESOURCES and stored.header is not None
    assert rows(store) == (2, 2)
    monkeypatch.undo()
    again = storer.store(arrive(spool, received[1]), association, None)
    assert again.code == SUCCESS and rows(store) == (2, 3)
    assert read_header(spool.path_of(Spool.relpath_for(stored.header))) == stored.header


def test_a_header_the_receiver_read_is_not_read_again(
    store: Database, tmp_path: Path, received: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver that parsed the header itself (a native transport) passes the fields in: the
    file is stored under them and not parsed again."""
    spool, storer, association = setup(store, tmp_path)
    header = read_header(received[0])

    def no_second_read(path: Path, *, whole: bool = False) -> None:
        raise AssertionError(f"{path} read again")

    monkeypatch.setattr("triage_node.dicom.storing.read_header", no_second_read)
    stored = storer.store(arrive(spool, received[0]), association, None, header=header)
    assert (stored.code, stored.header) == (SUCCESS, header)
    assert spool.path_of(Spool.relpath_for(header)).read_bytes() == received[0].read_bytes()
    assert rows(store) == (1, 1)


def test_a_transport_other_than_pynetdicom_keeps_the_same_records(
    store: Database, tmp_path: Path, received: list[Path]
) -> None:
    """StorageHandlers' transport-neutral calls (a native receiver's front uses them): the
    association is recorded under the transport's own key, its instance is stored and counted
    with it, its end is recorded once and rings the settle doorbell."""
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    ended: list[bool] = []
    handlers = StorageHandlers(
        spool, store.intake, 0, utcnow, on_association_end=lambda: ended.append(True)
    )
    key = object()
    association = handlers.opened(key, "PACS", "TRIAGE_NODE", "127.0.0.1")
    header = read_header(received[0])
    request = SimpleNamespace(
        AffectedSOPClassUID=header.sop_class_uid, AffectedSOPInstanceUID=header.sop_instance_uid
    )
    partial = arrive(spool, received[0])
    assert handlers.stored(key, partial, request, "PACS") == (SUCCESS, "")
    assert not partial.exists() and rows(store) == (1, 1)
    with store.engine.connect() as conn:
        assert conn.execute(select(instances.c.association_id)).scalar_one() == association
    wrong = SimpleNamespace(AffectedSOPClassUID=header.sop_class_uid, AffectedSOPInstanceUID="1.2")
    partial = arrive(spool, received[1])
    code, comment = handlers.stored(key, partial, wrong, "PACS")
    assert code == CANNOT_UNDERSTAND and comment.startswith("SOP Instance UID differs")
    assert not partial.exists() and rows(store) == (1, 1)
    handlers.ended(key, AssociationEnd.RELEASED)
    handlers.ended(key, AssociationEnd.ABORTED)  # once only
    with store.engine.connect() as conn:
        assert conn.execute(select(associations.c.end_reason)).scalar_one() == "RELEASED"
    assert ended == [True]
