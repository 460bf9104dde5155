"""DICOMweb credentials (triage_node.credentials) and their settings."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from triage_node.config import load_config
from triage_node.credentials import Credentials, hash_problem, hash_secret, matches
from triage_node.errors import ConfigError


def basic(name: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()


def test_a_hash_matches_its_secret_only_and_is_salted() -> None:
    first, second = (
        hash_secret("s3cret", iterations=10_000),
        hash_secret("s3cret", iterations=10_000),
    )
    assert first != second  # salted
    assert hash_problem(first) is None
    assert matches("s3cret", first) and not matches("s3cret ", first)


def test_bearer_tokens_and_basic_users_are_checked() -> None:
    credentials = Credentials(
        [hash_secret("token-1", iterations=10_000)],
        [f"alice:{hash_secret('pw', iterations=10_000)}"],
    )
    assert credentials.check("Bearer token-1") == credentials.check("Bearer token-1")
    assert credentials.check("Bearer token-1").kind == "token"  # type: ignore[union-attr]
    assert credentials.check(basic("alice", "pw")).name == "alice"  # type: ignore[union-attr]
    for refused in (None, "", "Bearer token-2", basic("alice", "PW"), basic("bob", "pw")):
        assert credentials.check(refused) is None
    assert credentials.check("Basic !!!not-base64") is None
    assert Credentials([], [], allow_anonymous=True).check(None).kind == "anonymous"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ("port = 8042\n", "nobody may store"),
        ('port = 8042\ntokens = ["plain-text"]\n', "is not a pbkdf2_sha256 hash"),
        ('port = 8042\nusers = ["alice"]\n', "must be NAME:HASH"),
        ("port = 11112\nallow_anonymous = true\n", "must differ from the DICOM ports"),
        ('port = 8042\nallow_anonymous = true\ntls_cert_file = "c.pem"\n', "go together"),
        ('base_path = "dicom-web"\n', "must start with /"),
    ],
)
def test_settings_that_cannot_work_are_refused(tmp_path: Path, settings: str, message: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text("[dicomweb]\n" + settings)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_a_hash_from_hash_secret_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    hashed = hash_secret("t", iterations=10_000)
    path.write_text(f'[dicomweb]\nport = 8042\ntokens = ["{hashed}"]\nusers = ["pacs:{hashed}"]\n')
    config = load_config(path)
    assert config.dicomweb.tokens == [hashed] and config.dicomweb.users == [f"pacs:{hashed}"]
