"""Raw upper-layer PDUs for tests that talk to the node below pynetdicom's API."""

from __future__ import annotations

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import build_context

DX = "1.2.840.10008.5.1.4.1.1.1.1"
CONTEXT_ID_OFFSET = 103  # of the presentation context ID in association_request()


def association_request(called: str = "TRIAGE_NODE") -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "FUZZER"
    primitive.called_ae_title = called
    primitive.maximum_length_received = 16384
    primitive.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.2.1"
    context = build_context(DX, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())
