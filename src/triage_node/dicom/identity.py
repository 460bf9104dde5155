"""The node's implementation identity on the wire and in the files pynetdicom writes.

pynetdicom announces its own Implementation Class UID and Version Name unless told otherwise,
and writes them into the File Meta of every dataset it streams to a file. :func:`node_ae`
makes every application entity of the node (receiving, storing, querying, echoing) announce
the node's (:data:`triage_node.domain.IMPLEMENTATION_CLASS_UID`); :func:`stamp_received_files`
makes the streamed files name the node as the implementation that wrote them.
"""

from __future__ import annotations

import functools

import pynetdicom.dimse_messages
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.dsutils import create_file_meta

from triage_node.domain import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME


def node_ae(ae_title: str) -> AE:
    """An application entity that announces the node's implementation identity."""
    ae = AE(ae_title=ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return ae


def stamp_received_files() -> None:
    """Files pynetdicom streams received datasets to carry the node's identity in their File
    Meta (receiver processes call it once)."""
    pynetdicom.dimse_messages.create_file_meta = functools.partial(  # type: ignore[attr-defined]
        create_file_meta,
        implementation_uid=UID(IMPLEMENTATION_CLASS_UID),
        implementation_version=IMPLEMENTATION_VERSION_NAME,
    )
