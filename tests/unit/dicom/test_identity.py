"""The node's implementation identity (dicom/identity, domain)."""

from __future__ import annotations

import pynetdicom.dimse_messages
from pydicom.uid import UID

from triage_node.dicom.identity import node_ae, stamp_received_files
from triage_node.domain import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME


def test_the_identity_is_a_valid_uid_and_version_name() -> None:
    assert UID(IMPLEMENTATION_CLASS_UID).is_valid
    assert len(IMPLEMENTATION_CLASS_UID) <= 64
    assert 1 <= len(IMPLEMENTATION_VERSION_NAME) <= 16
    assert IMPLEMENTATION_VERSION_NAME.startswith("TRIAGENODE_")
    assert "\\" not in IMPLEMENTATION_VERSION_NAME


def test_every_application_entity_announces_the_node() -> None:
    ae = node_ae("TRIAGE_NODE")
    assert ae.ae_title == "TRIAGE_NODE"
    assert ae.implementation_class_uid == IMPLEMENTATION_CLASS_UID
    assert ae.implementation_version_name == IMPLEMENTATION_VERSION_NAME


def test_streamed_files_get_the_node_in_their_file_meta() -> None:
    original = pynetdicom.dimse_messages.create_file_meta  # type: ignore[attr-defined]
    try:
        stamp_received_files()
        meta = pynetdicom.dimse_messages.create_file_meta(  # type: ignore[attr-defined]
            sop_class_uid=UID("1.2.840.10008.5.1.4.1.1.1"),
            sop_instance_uid=UID("1.2.3.4"),
            transfer_syntax=UID("1.2.840.10008.1.2.1"),
        )
    finally:
        pynetdicom.dimse_messages.create_file_meta = original  # type: ignore[attr-defined]
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    assert meta.MediaStorageSOPInstanceUID == "1.2.3.4"
