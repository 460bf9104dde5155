"""Domain records for tests."""

from __future__ import annotations

from triage_node.domain import InstanceHeader


def header(study: str = "1.2.3", sop: str = "1.2.3.1.1", modality: str = "CR") -> InstanceHeader:
    """A valid header of one instance in *study* (series ``<study>.1``)."""
    return InstanceHeader(
        study_uid=study,
        series_uid=study + ".1",
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality=modality,
        body_part="HAND",
        series_description="PA",
        accession_number="ACC1",
        study_date="20260101",
    )
