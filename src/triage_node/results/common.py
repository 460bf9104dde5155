"""What every result object shares: deterministic UIDs (PS3.5 B.2, ``2.25.`` UUID form), the
algorithm and the analysed image as the objects describe them, the source header they copy, and
the device observer and contributing equipment that name the node."""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import DA, TM

from triage_node import __version__
from triage_node.domain import MANUFACTURER, ResultKind

_UID_NAMESPACE = uuid.UUID("5b1f3a4e-2c53-4c1e-9d0e-7a7c1e2f9b10")  # triage-node's own


def derived_uid(*parts: str) -> str:
    """A UID named by *parts*: "2.25." and a name-based (SHA-1) UUID (PS3.5 B.2)."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(0).join(parts)).int}"


@dataclass(frozen=True, slots=True)
class Algorithm:
    name: str
    version: str
    operating_point: str
    threshold: float

    @property
    def device_uid(self) -> str:
        return derived_uid("device", self.name)


@dataclass(frozen=True, slots=True)
class AnalysedImage:
    source: Dataset  # the source instance's header (pixel data not needed)
    probability: float
    positive: bool
    peak_row: int
    peak_column: int
    peak_area: float  # share of the image at least half as hot as the peak


@dataclass(frozen=True, slots=True)
class ResultUIDs:
    """Deterministic UIDs of one result set: same study, model and result version, same UIDs."""

    study_uid: str
    model_version: str
    result_version: str | int  # changes exactly when the analysed content changes

    def uid(self, *parts: str) -> str:
        return derived_uid(
            "result", self.study_uid, self.model_version, str(self.result_version), *parts
        )

    def series(self, kind: ResultKind) -> str:
        return self.uid(kind, "series")

    def instance(self, kind: ResultKind, index: int = 0) -> str:
        return self.uid(kind, "instance", str(index))


@contextmanager
def tolerant_of_source_names() -> Iterator[None]:
    """Source headers carry what modalities wrote: highdicom warns about person names such as a
    single-component Referring Physician's Name, copied unchanged from the source. Not our error."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The string .* person name", category=UserWarning)
        yield


# Type 2 attributes of the Patient and General Study modules that the result objects copy from
# their source (PS3.3 C.7.1.1, C.7.2.1). A source that lacks one gets it empty, as Type 2 allows.
_COPIED_TYPE_2 = (
    ("PatientName", "PN"),
    ("PatientID", "LO"),
    ("PatientBirthDate", "DA"),
    ("PatientSex", "CS"),
    ("StudyDate", "DA"),
    ("StudyTime", "TM"),
    ("ReferringPhysicianName", "PN"),
    ("StudyID", "SH"),
    ("AccessionNumber", "SH"),
)


NOT_STATED = "not stated in the source images"
_DATE_AND_TIME = {"DA": DA, "TM": TM}


def _usable(value: object, vr: str) -> bool:
    """Whether a copied DA/TM value is one the result objects can carry (highdicom converts
    them and refuses what PS3.5 6.2 does not allow, such as a hostile '\xb820000'); an empty
    value converts to None."""
    try:
        _DATE_AND_TIME[vr](str(value or ""))
    except (ValueError, TypeError, OverflowError):
        return False
    return True


def evidence_header(source: Dataset) -> Dataset:
    """A copy of a source header with what the result objects copy from it made valid: the
    Type 2 attributes present (a date or time that is not one made empty), and — when the
    source says Patient Identity Removed YES but not how (its own Type 1C omission, PS3.3
    C.7.1.1) — De-identification Method saying so, and for an animal patient (a species given)
    Patient's Sex Neutered, empty, as Type 2C allows."""
    header = Dataset()
    header.update(source)
    if hasattr(source, "file_meta"):
        header.file_meta = source.file_meta
    for keyword, vr in _COPIED_TYPE_2:
        if keyword not in header:
            header.add_new(keyword, vr, "")
        elif vr in _DATE_AND_TIME and not _usable(header[keyword].value, vr):
            header.add_new(keyword, vr, "")  # empty, as Type 2 allows, rather than no result
    stated = "DeidentificationMethod" in header or "DeidentificationMethodCodeSequence" in header
    if str(header.get("PatientIdentityRemoved", "")).upper() == "YES" and not stated:
        header.DeidentificationMethod = NOT_STATED
    animal = "PatientSpeciesDescription" in header or "PatientSpeciesCodeSequence" in header
    if animal and "PatientSexNeutered" not in header:
        header.add_new("PatientSexNeutered", "CS", "")
    return header


UTF_8 = "ISO_IR 192"
_KNOWN_CHARACTER_SETS = frozenset(m.value for m in hd.SpecificCharacterSetValues)
_MULTI_BYTE_EXTENSIONS = frozenset({"ISO 2022 IR 87", "ISO 2022 IR 159", "ISO 2022 IR 149"})


def _valid_character_set(values: list[str]) -> bool:
    """PS3.3 C.12.1.1.2: one value without code extensions, or several that all use them
    (the first not a multi-byte one)."""
    if any(v not in _KNOWN_CHARACTER_SETS for v in values):
        return False
    if len(values) == 1:
        return not values[0].startswith("ISO 2022")
    return all(v.startswith("ISO 2022") for v in values) and values[0] not in _MULTI_BYTE_EXTENSIONS


def character_set(source: Dataset) -> str | list[str] | None:
    """The Specific Character Set for an object made from *source*: the source's own, made
    valid. Modalities write a single "ISO 2022 IR 100" (code extensions with one value, which
    PS3.3 C.12.1.1.2 forbids and highdicom refuses); that is "ISO_IR 100". A value that is still
    not valid becomes UTF-8, which can hold whatever text the source decoded to."""
    value = source.get("SpecificCharacterSet")
    if not value:
        return None
    values = [value] if isinstance(value, str) else [str(v) for v in value]
    values = [v.strip() for v in values]
    if len(values) == 1 and values[0].startswith("ISO 2022 IR "):
        code = values[0].removeprefix("ISO 2022 IR ")
        values = [] if code == "6" else [f"ISO_IR {code}"]
        if not values:
            return None
    if not _valid_character_set(values):
        return UTF_8
    return values[0] if len(values) == 1 else values


def device_observer(algorithm: Algorithm) -> hd.sr.ObserverContext:
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=algorithm.device_uid,
            name=algorithm.name,
            manufacturer_name=MANUFACTURER,
            model_name=algorithm.name,
        ),
    )


def equipment(algorithm: Algorithm) -> hd.ContributingEquipment:
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=algorithm.name,
        software_versions=f"{__version__} model {algorithm.version}",
        device_serial_number=algorithm.device_uid[-16:],
    )


def algorithm_id(algorithm: Algorithm) -> hd.sr.AlgorithmIdentification:
    """TID 4019 as PS3.16 lists it: name, version, parameters (the manufacturer is the device
    observer's and the Contributing Equipment's; TID 4019 has no row for it)."""
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[
            f"operating point {algorithm.operating_point}",
            f"threshold {algorithm.threshold:.6g}",
        ],
    )
