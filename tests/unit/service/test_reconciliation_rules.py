"""Which objects found in the PACS count as a radiologist's report."""

from __future__ import annotations

from triage_node.config import load_config
from triage_node.dicom.find_scu import PacsObject, PacsSeries, StudyContents
from triage_node.service.reconciliation import ReportRules

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
PDF = "1.2.840.10008.5.1.4.1.1.104.1"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
SC = "1.2.840.10008.5.1.4.1.1.7"


def rules(**settings: str) -> ReportRules:
    env = {f"TRIAGE_NODE_RECONCILE_{k.upper()}": v for k, v in settings.items()}
    return ReportRules(load_config(environ=env).reconcile)


def obj(sop_class: str, completion: str = "", verification: str = "", **series: str) -> PacsObject:
    one = PacsSeries(
        series.get("uid", "1.2.9"), series.get("modality", "SR"), series.get("description", "")
    )
    return PacsObject(one, "1.2.9.1", sop_class, completion, verification)


def test_final_or_verified_sr_and_pdf_are_reports() -> None:
    default = rules()
    assert default.why_report(obj(COMPREHENSIVE_SR, "COMPLETE", "UNVERIFIED")) is not None
    assert default.why_report(obj(BASIC_TEXT_SR, "PARTIAL", "VERIFIED")) is not None
    assert default.why_report(obj(PDF, modality="DOC")) == "Encapsulated PDF"


def test_drafts_unknown_flags_and_other_objects_are_not() -> None:
    default = rules()
    assert default.why_report(obj(COMPREHENSIVE_SR, "PARTIAL", "UNVERIFIED")) is None
    assert default.why_report(obj(COMPREHENSIVE_SR)) is None  # the PACS did not say
    assert default.why_report(obj(KOS, modality="KO")) is None
    assert default.why_report(obj(SC, modality="OT", description="REPORT")) is None


def test_configured_series_rules() -> None:
    configured = rules(report_modalities="KO", report_series_descriptions="*report*,Befund*")
    assert configured.why_report(obj(KOS, modality="KO")) is not None
    assert (
        configured.why_report(obj(SC, modality="OT", description="Final REPORT scan")) is not None
    )
    assert configured.why_report(obj(SC, modality="OT", description="befund 1")) is not None
    assert configured.why_report(obj(SC, modality="OT", description="heatmap")) is None
    assert configured.series_rule(PacsSeries("1.2", "KO", ""))


def test_the_nodes_own_objects_never_count() -> None:
    final = obj(COMPREHENSIVE_SR, "COMPLETE", "VERIFIED")
    contents = StudyContents(True, ("SR",), (final.series,), (final,))
    assert rules().find_report(contents, own={final.sop_instance_uid}) is None
    assert "Comprehensive SR" in str(rules().find_report(contents, own=set()))
