"""The codes and fixed values the result objects use: the finding, its presence, the
probability's concept and unit, the key-object title, series numbers and the heatmap's warning
(PS3.16 codes; SNOMED CT by its DICOM-licensed identifiers)."""

from __future__ import annotations

from highdicom.sr import CodedConcept

from triage_node.domain import ResultKind

FRACTURE = CodedConcept("125605004", "SCT", "Fracture of bone")
PRESENT = CodedConcept("52101004", "SCT", "Present")
ABSENT = CodedConcept("272519000", "SCT", "Absent")
CERTAINTY = CodedConcept("111012", "DCM", "Certainty of Finding")
UNITLESS = CodedConcept("1", "UCUM", "no units")
OF_INTEREST = CodedConcept("113000", "DCM", "Of Interest")
IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging procedure")  # CID 100
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
SERIES_NUMBERS = {ResultKind.SR: 9901, ResultKind.SC: 9902, ResultKind.KO: 9903}
HEATMAP_DESCRIPTION = "AI FRACTURE HEATMAP - NOT FOR DIAGNOSTIC USE"
