import pytest

from triage_node.domain import InstanceHeader, is_valid_uid, validate_uid
from triage_node.errors import InvalidUID


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.2", "1", "1.2.3." + "4" * 58, "1.02.3"])
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)


@pytest.mark.parametrize(
    "uid",
    [
        "",
        "../../etc/passwd",
        "1.2/3",
        "1..2",
        ".1",
        "1.2.",
        "1.2.3 ",
        "1.2.a",
        "1." + "2" * 64,
        None,
        12,
    ],
)
def test_invalid_uids(uid: object) -> None:
    assert not is_valid_uid(uid)
    with pytest.raises(InvalidUID, match="Study Instance UID"):
        validate_uid(uid, "Study Instance UID")


def test_header_refuses_unsafe_uids() -> None:
    with pytest.raises(InvalidUID, match="SOP Instance UID"):
        InstanceHeader(
            study_uid="1.2",
            series_uid="1.3",
            sop_instance_uid="../../x",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
            transfer_syntax_uid="1.2.840.10008.1.2",
            modality="CR",
            body_part="",
            series_description="",
            accession_number="",
            study_date="",
        )
