"""Scope gating by DICOM tags: Body Part Examined, then descriptions, then the admin's policy."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from triage_node.analysis.scope import FRACATLAS_SCOPE, Scope, scope_from_document, words_of


def header(**values: str) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    "part",
    [
        "HAND",
        "L HAND",
        "Hand_Rt",
        "WRIST",
        "FINGER",
        "FOOT",
        "ANKLE",
        "KNEE",
        "LEG",
        "LOWER LEG",
        "HIP",
        "PELVIS",
        "SHOULDER",
        "ARM",
        "UPPER ARM",
        "HUMERUS",
        "ELBOW",
        "FOREARM",
        "EXTREMITY",
        "TOE",
        "FEMUR",
        "CLAVICLE",
    ],
)
def test_limb_body_parts_are_in_scope(part: str) -> None:
    decision = FRACATLAS_SCOPE.decide(header(BodyPartExamined=part))
    assert decision.analyse, decision.reason
    assert "Body Part Examined" in decision.reason


@pytest.mark.parametrize(
    "part",
    [
        "CHEST",
        "THORAX",
        "CSPINE",
        "LSPINE",
        "CERVICAL SPINE",
        "SKULL",
        "HEAD",
        "BREAST",
        "ABDOMEN",
        "WHOLE BODY",
        "NECK",
    ],
)
def test_other_body_parts_are_out_of_scope_with_a_reason(part: str) -> None:
    decision = FRACATLAS_SCOPE.decide(header(BodyPartExamined=part))
    assert not decision.analyse
    assert decision.reason.startswith("out of scope: Body Part Examined")


def test_descriptions_decide_when_body_part_is_missing_or_unknown() -> None:
    assert FRACATLAS_SCOPE.decide(header(StudyDescription="XR WRIST 3 VIEWS LEFT")).analyse
    assert FRACATLAS_SCOPE.decide(header(SeriesDescription="Knee AP/LAT")).analyse
    chest = FRACATLAS_SCOPE.decide(header(BodyPartExamined="B\u00e4cken", ProtocolName="CHEST PA"))
    assert not chest.analyse and "description or protocol name" in chest.reason
    # Both kinds of word (or none) decide nothing: the policy does.
    both = header(StudyDescription="ABDOMEN PELVIS")
    assert FRACATLAS_SCOPE.decide(both, "analyse").analyse
    assert not FRACATLAS_SCOPE.decide(both, "skip").analyse


def test_unlabelled_images_follow_the_policy() -> None:
    nothing = header()
    analysed = FRACATLAS_SCOPE.decide(nothing, "analyse")
    assert analysed.analyse and "image guard decides" in analysed.reason
    skipped = FRACATLAS_SCOPE.decide(nothing, "skip")
    assert not skipped.analyse and skipped.reason.startswith("out of scope")
    assert Scope().decide(header(BodyPartExamined="CHEST")).analyse  # no list: any body part


def test_hostile_values_are_words_only_and_quoted_short() -> None:
    assert words_of("R\x00HAND;DROP TABLE") == ["HAND", "DROP", "TABLE"]
    decision = FRACATLAS_SCOPE.decide(header(BodyPartExamined="X" * 60 + "<script>"))
    assert len(decision.reason) < 200 and "<" not in decision.reason


def test_manifest_document_round_trips_and_is_checked() -> None:
    again = scope_from_document(FRACATLAS_SCOPE.to_document())
    assert again == FRACATLAS_SCOPE
    with pytest.raises(ValueError, match="body_parts"):
        scope_from_document({"body_parts": "HAND"})
    assert scope_from_document(None).open
