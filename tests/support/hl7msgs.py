"""HL7 v2 messages a RIS sends, for tests of the report feed."""

from __future__ import annotations

from tests.support.synth import SYNTHETIC_PATIENT_ID, SYNTHETIC_PATIENT_NAME


def oru(status: str, accession: str, control: str = "C1", zds: str = "") -> bytes:
    """An ORU^R01 with result status OBR-25 *status*, accession number in OBR-18 and, with
    *zds*, the Study Instance UID in a ZDS segment; synthetic patient values in PID."""
    obr = ["OBR", "1", "", ""] + [""] * 14 + [accession] + [""] * 6 + [status]
    segments = [
        f"MSH|^~\\&|RIS|HOSP|TRIAGE|HOSP|20261123||ORU^R01^ORU_R01|{control}|P|2.5.1",
        f"PID|1||{SYNTHETIC_PATIENT_ID}^^^HOSP||{SYNTHETIC_PATIENT_NAME}",
        "|".join(obr),
        "OBX|1|TX|REPORT||Distal radius fracture.||||||F",
    ]
    if zds:
        segments.append(f"ZDS|{zds}^^Application^DICOM")
    return ("\r".join(segments) + "\r").encode()
