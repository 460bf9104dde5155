"""What a model is for: body parts by DICOM tags, before any pixel is decoded.

A flag on a chest film from a limb model is a false alarm the radiologist pays for, so the node
asks the header first, most specific first:

1. Body Part Examined (0018,0015), compared with the model's list of PS3.16 Annex L / CID 4031
   defined terms and their common vendor spellings (laterality and punctuation ignored:
   ``L HAND``, ``Hand_Rt`` and ``HAND`` are one body part);
2. failing that, the words of Study Description, Series Description and Protocol Name;
3. failing both, the admin's policy for images that say nothing (``analyse``: the image-based
   guard of the model decides; ``skip``).

A value from the model's out-of-scope list decides as firmly as one from its list; a description
that names both (``ABDOMEN PELVIS``) decides nothing. Every string is hostile input: it is only
upper-cased, split into words and compared, and a reason quotes at most 32 of its characters.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydicom.dataset import Dataset

UnlabelledPolicy = Literal["analyse", "skip"]
UNLABELLED_POLICIES: tuple[UnlabelledPolicy, ...] = ("analyse", "skip")
DESCRIPTIONS = ("StudyDescription", "SeriesDescription", "ProtocolName")
LATERALITY = frozenset({"L", "R", "LT", "RT", "LEFT", "RIGHT", "BILAT", "BILATERAL", "BOTH", "B"})
QUOTED = 32

# The FracAtlas regions (hand, leg, hip, shoulder) as CID 4031 defined terms and spellings seen
# from vendors; the words for descriptions include plurals and common abbreviations.
_IN = (
    "HAND FINGER THUMB WRIST CARPUS FOREARM RADIUS ULNA ELBOW ARM UPPER ARM HUMERUS SHOULDER "
    "CLAVICLE SCAPULA ACJOINT FOOT TOE ANKLE CALCANEUS HEEL LEG LOWER LEG TIBIA FIBULA KNEE "
    "PATELLA FEMUR THIGH HIP PELVIS EXTREMITY UPPER EXTREMITY LOWER EXTREMITY UPPER LIMB "
    "LOWER LIMB UPRLIMB LOWRLIMB LOWER EXTREMITY LEG"
)
_OUT = (
    "CHEST THORAX LUNG RIB SKULL HEAD BRAIN FACE SINUS NOSE JAW MANDIBLE ORBIT NECK TMJ "
    "SPINE CSPINE TSPINE LSPINE SSPINE CERVICAL SPINE THORACIC SPINE LUMBAR SPINE SACRUM COCCYX "
    "ABDOMEN KIDNEY BLADDER BREAST HEART WHOLEBODY WHOLE BODY TEETH TOOTH DENTAL"
)
_IN_WORDS = (
    "HAND HANDS FINGER FINGERS THUMB WRIST WRISTS CARPAL SCAPHOID FOREARM RADIUS ULNA ELBOW "
    "ELBOWS ARM HUMERUS SHOULDER SHOULDERS CLAVICLE SCAPULA AC FOOT FEET TOE TOES ANKLE ANKLES "
    "CALCANEUS HEEL LEG LEGS TIBIA FIBULA KNEE KNEES PATELLA FEMUR THIGH HIP HIPS PELVIS "
    "EXTREMITY EXTREMITIES LIMB"
)
_OUT_WORDS = (
    "CHEST THORAX THORACIC LUNG LUNGS RIB RIBS SKULL HEAD BRAIN FACE FACIAL SINUS SINUSES NASAL "
    "MANDIBLE ORBIT ORBITS NECK SPINE SPINAL CSPINE TSPINE LSPINE CERVICAL LUMBAR SACRUM COCCYX "
    "ABDOMEN ABDOMINAL ABD KUB BREAST MAMMO MAMMOGRAPHY MAMMOGRAM CARDIAC DENTAL TEETH PANORAMIC"
)


def _terms(text: str) -> tuple[str, ...]:
    """Space-separated single terms, plus two-word terms written 'UPPER ARM' style as one."""
    words = text.split()
    terms = set(words)
    for first, second in itertools.pairwise(words):
        if first in ("UPPER", "LOWER", "WHOLE", "CERVICAL", "THORACIC", "LUMBAR"):
            terms.add(f"{first} {second}")
    return tuple(sorted(terms - {"UPPER", "LOWER", "WHOLE"}))


def words_of(value: object) -> list[str]:
    """Upper-case words of a header value, laterality dropped ('Hand_Rt' -> ['HAND'])."""
    text = re.sub(r"[^A-Z]+", " ", str(value or "").upper()[:256])
    return [w for w in text.split() if w not in LATERALITY]


def _quote(value: object) -> str:
    text = re.sub(r"[^\w /-]", "?", str(value or ""))[:QUOTED]
    return text.strip() or "?"


@dataclass(frozen=True, slots=True)
class Decision:
    analyse: bool
    reason: str  # why it is analysed or skipped (names the tag that decided)


@dataclass(frozen=True, slots=True)
class Scope:
    """The body parts a model is for, and those it certainly is not for; empty = any."""

    body_parts: tuple[str, ...] = ()
    excluded_body_parts: tuple[str, ...] = ()
    words: tuple[str, ...] = ()
    excluded_words: tuple[str, ...] = ()
    regions: tuple[str, ...] = field(default=())  # for people: what the list means

    @property
    def open(self) -> bool:
        return not self.body_parts

    def _body_part(self, value: object) -> bool | None:
        words = words_of(value)
        if not words:
            return None
        joined = " ".join(words)
        candidates = {joined, *words, *(" ".join(p) for p in itertools.pairwise(words))}
        if joined.replace(" ", "") in self.body_parts:
            return True
        if candidates & set(self.excluded_body_parts):
            return False
        if candidates & set(self.body_parts):
            return True
        return None

    def _description(self, values: list[object]) -> bool | None:
        words = {w for value in values for w in words_of(value)}
        inside, outside = bool(words & set(self.words)), bool(words & set(self.excluded_words))
        if inside == outside:
            return None  # neither, or both: this decides nothing
        return inside

    def decide(self, ds: Dataset, unlabelled: UnlabelledPolicy = "analyse") -> Decision:
        if self.open:
            return Decision(True, "the model names no body parts")
        part = ds.get("BodyPartExamined", "")
        verdict = self._body_part(part)
        if verdict is not None:
            said = f"Body Part Examined {_quote(part)}"
            if verdict:
                return Decision(True, f"{said} is in the model's scope")
            return Decision(False, f"out of scope: {said} is not a body part the model is for")
        texts = [ds.get(keyword, "") for keyword in DESCRIPTIONS]
        verdict = self._description(texts)
        if verdict is not None:
            where = "the study/series description or protocol name"
            if verdict:
                return Decision(True, f"{where} names a body part the model is for")
            return Decision(False, f"out of scope: {where} names a body part the model is not for")
        said = (
            f"Body Part Examined {_quote(part)} is not a known term"
            if part
            else ("the header names no body part")
        )
        if unlabelled == "skip":
            return Decision(False, f"out of scope: {said} (policy: skip such images)")
        return Decision(True, f"{said}; analysed (policy), the image guard decides")

    def to_document(self) -> dict[str, Any]:
        return {
            "regions": list(self.regions),
            "body_parts": list(self.body_parts),
            "excluded_body_parts": list(self.excluded_body_parts),
            "description_words": list(self.words),
            "excluded_description_words": list(self.excluded_words),
        }


def scope_from_document(document: Any) -> Scope:
    """The manifest's ``scope`` section (ValueError naming the bad key)."""
    if document is None:
        return Scope()
    if not isinstance(document, dict):
        raise ValueError("must be an object")

    def strings(key: str) -> tuple[str, ...]:
        value = document.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{key} must be a list of strings")
        return tuple(v.upper() for v in value)

    return Scope(
        body_parts=strings("body_parts"),
        excluded_body_parts=strings("excluded_body_parts"),
        words=strings("description_words"),
        excluded_words=strings("excluded_description_words"),
        regions=tuple(str(v) for v in document.get("regions", []) if isinstance(v, str)),
    )


FRACATLAS_SCOPE = Scope(
    body_parts=_terms(_IN),
    excluded_body_parts=_terms(_OUT),
    words=tuple(sorted(set(_IN_WORDS.split()))),
    excluded_words=tuple(sorted(set(_OUT_WORDS.split()))),
    regions=("hand/wrist/fingers", "foot/ankle", "leg/knee", "hip/pelvis", "shoulder/arm"),
)
