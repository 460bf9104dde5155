from pathlib import Path

import pytest

from triage_node.config import describe_settings, load_config
from triage_node.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_defaults_work_without_a_file() -> None:
    config = load_config(None, {})
    assert config.dicom.port == 11112
    assert config.dicom.ae_title == "TRIAGE_NODE"
    assert config.database_url == "sqlite:///var/triage-node.sqlite3"
    assert config.storage.spool_path == Path("var/spool")
    assert config.source == "defaults"


def test_file_then_environment(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(
        '[dicom]\nport = 104\nallowed_calling_aes = ["PACS1"]\n[study]\nsettle_seconds = 3\n'
    )
    config = load_config(path, {"TRIAGE_NODE_DICOM_PORT": "4242"})
    assert config.dicom.port == 4242  # environment wins over the file
    assert config.dicom.allowed_calling_aes == ["PACS1"]
    assert config.study.settle_seconds == 3.0
    assert config.source == str(path)


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[dicom]\nae_title = "XR_TRIAGE"\n')
    assert load_config(None, {"TRIAGE_NODE_CONFIG": str(path)}).dicom.ae_title == "XR_TRIAGE"


def test_environment_types() -> None:
    config = load_config(
        None,
        {
            "TRIAGE_NODE_DICOM_ALLOWED_NETWORKS": "10.0.0.0/8, 192.168.1.7",
            "TRIAGE_NODE_DICOM_REQUIRE_CALLED_AE": "no",
            "TRIAGE_NODE_STORAGE_SPOOL_DIR": "/srv/spool",
            "TRIAGE_NODE_DATABASE_URL": "postgresql+psycopg://u@db/triage",
        },
    )
    assert config.dicom.allowed_networks == ["10.0.0.0/8", "192.168.1.7"]
    assert config.dicom.require_called_ae is False
    assert config.storage.spool_path == Path("/srv/spool")
    assert config.database_url == "postgresql+psycopg://u@db/triage"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"TRIAGE_NODE_DICOM_PORT": "70000"},
            "dicom.port (TRIAGE_NODE_DICOM_PORT): must be between",
        ),
        ({"TRIAGE_NODE_DICOM_PORT": "eleven"}, "dicom.port (TRIAGE_NODE_DICOM_PORT): cannot read"),
        ({"TRIAGE_NODE_DICOM_AE_TITLE": "A" * 17}, "dicom.ae_title"),
        ({"TRIAGE_NODE_DICOM_ALLOWED_NETWORKS": "10.0.0.300"}, "not an IP address"),
        ({"TRIAGE_NODE_LOG_LEVEL": "LOUD"}, "log.level"),
        ({"TRIAGE_NODE_DATABASE_URL": "mysql://x"}, "database.url"),
        ({"TRIAGE_NODE_DICOM_PROT": "1"}, "dicom.prot (TRIAGE_NODE_DICOM_PROT): unknown setting"),
        ({"TRIAGE_NODE_NOPE": "1"}, "TRIAGE_NODE_NOPE: not a triage-node setting"),
        ({"TRIAGE_NODE_DICOM_REQUIRE_CALLED_AE": "maybe"}, "must be true or false"),
    ],
)
def test_bad_environment_values_name_the_key(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, env)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[dicom]\nport = '104'\n", "dicom.port"),
        ("[dicom]\nport = true\n", "must be a whole number"),
        ("[dicom]\nallowed_calling_aes = 'PACS'\n", "must be a list of strings"),
        ("[dicomm]\nport = 1\n", "unknown section"),
        ("[dicom\nport = 1\n", "not valid TOML"),
    ],
)
def test_bad_file_values_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(path, {})
    assert str(path) in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", {})


def test_every_setting_is_documented() -> None:
    guide = (REPO / "docs" / "configuration.md").read_text()
    for section, key, _default, doc in describe_settings():
        assert f"`{section}.{key}`" in guide, f"{section}.{key} missing from docs/configuration.md"
        assert doc, f"{section}.{key} has no description"


def test_example_config_is_valid() -> None:
    config = load_config(REPO / "deploy" / "triage-node.example.toml", {})
    assert config.dicom.ae_title


def test_delivery_destinations_are_checked() -> None:
    good = load_config(
        None, {"TRIAGE_NODE_DELIVERY_DESTINATIONS": "PACS@10.0.0.5:104, ARCHIVE@h.example:2762+tls"}
    )
    [first, second] = good.delivery.parsed_destinations
    assert (first.ae_title, first.port, first.tls) == ("PACS", 104, False)
    assert (second.host, second.tls) == ("h.example", True)
    with pytest.raises(ConfigError, match=r"delivery\.destinations .*not AE_TITLE@host:port"):
        load_config(None, {"TRIAGE_NODE_DELIVERY_DESTINATIONS": "PACS@host"})


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"TRIAGE_NODE_DICOM_TLS_PORT": "2762"},
            "needs dicom.tls_cert_file and dicom.tls_key_file",
        ),
        (
            {
                "TRIAGE_NODE_DICOM_TLS_PORT": "11112",
                "TRIAGE_NODE_DICOM_TLS_CERT_FILE": "c.pem",
                "TRIAGE_NODE_DICOM_TLS_KEY_FILE": "k.pem",
            },
            "dicom.tls_port: must differ from dicom.port",
        ),
        ({"TRIAGE_NODE_DICOM_TLS_VERIFY_CLIENT": "true"}, "needs dicom.tls_ca_file"),
    ],
)
def test_tls_listener_settings_that_belong_together(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(environ=env)


def test_tls_listener_settings() -> None:
    config = load_config(
        environ={
            "TRIAGE_NODE_DICOM_TLS_PORT": "2762",
            "TRIAGE_NODE_DICOM_TLS_CERT_FILE": "/etc/triage-node/node.pem",
            "TRIAGE_NODE_DICOM_TLS_KEY_FILE": "/etc/triage-node/node.key",
        }
    )
    assert config.dicom.tls_port == 2762 and not config.dicom.tls_verify_client
    assert config.dicom.tls_key_file == Path("/etc/triage-node/node.key")
