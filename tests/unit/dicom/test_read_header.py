"""read_header: the fields the node keeps, read from only the elements they come from."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pydicom.dataset import Dataset

from tests.support.synth import radiograph
from triage_node.dicom.storing import HEADER_ELEMENTS, read_header
from triage_node.domain import InstanceHeader


def with_sequence_and_text(ds: Dataset, charset: str, description: str) -> Dataset:
    ds.SpecificCharacterSet = charset
    ds.SeriesDescription = description
    item = Dataset()
    item.CodeValue = "T-15460"
    item.CodingSchemeDesignator = "SRT"
    item.CodeMeaning = "Wrist"
    ds.AnatomicRegionSequence = [item]  # skipped over, between the elements that are read
    return ds


def test_every_field_but_the_transfer_syntax_is_read_from_its_element() -> None:
    fields = {f.name for f in dataclasses.fields(InstanceHeader)}
    assert set(HEADER_ELEMENTS) == fields - {"transfer_syntax_uid"}


def test_the_header_is_what_reading_the_whole_file_gives(tmp_path: Path) -> None:
    for charset, description in (("ISO_IR 192", "Hand, Grundgelenk ü ✓"), ("ISO_IR 100", "Hüfte")):
        ds = with_sequence_and_text(radiograph(64, 48), charset, description)
        path = tmp_path / "instance.dcm"
        ds.save_as(path, enforce_file_format=True)
        header = read_header(path)
        assert header == read_header(path, whole=True)
        assert header.series_description == description
        assert header.sop_instance_uid == ds.SOPInstanceUID
        assert header.accession_number == ds.AccessionNumber
        assert header.body_part == "HAND" and header.study_date == "20260101"
