"""deploy/: the hardened systemd unit (systemd-analyze), the compose file (docker compose config)
and the configuration files shipped next to them."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.peers import missing, require_tool, triage_node_command
from triage_node.config import load_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "triage-node.service"
MOST_EXPOSURE = 2.5  # systemd-analyze security: 0 = locked down ... 10 = unprotected


def installed_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this installation (verify checks the binary)."""
    text = UNIT.read_text().replace("/opt/triage-node/bin/triage-node", triage_node_command())
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    return unit


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    result = subprocess.run(
        [analyze, "verify", str(installed_unit(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    complaints = [line for line in result.stderr.splitlines() if UNIT.name in line]
    assert complaints == [], complaints


def test_systemd_unit_is_hardened(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(installed_unit(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    assert float(match.group(1)) <= MOST_EXPOSURE, result.stdout
    text = UNIT.read_text()
    for setting in (
        "UMask=0077",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "User=triage-node",
    ):
        assert setting in text


def compose_command() -> list[str]:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    if shutil.which("docker-compose"):
        return [str(shutil.which("docker-compose"))]
    missing("docker compose", "the docker compose plugin or Debian's docker-compose")
    raise AssertionError("unreachable")


def test_compose_file_is_valid_and_wires_node_postgres_and_orthanc() -> None:
    command = [*compose_command(), "-f", str(DEPLOY / "compose.yaml"), "config"]
    result = subprocess.run([*command, "-q"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    services = subprocess.run(
        [*command, "--services"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert sorted(services) == ["node", "orthanc", "postgres"]
    rendered = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert "postgresql+psycopg://triage:change-me@postgres/triage" in rendered
    assert '["TRIAGE_NODE", "node", 11112]' in rendered  # Orthanc knows the node as a modality

    # The node's configuration in the compose file is a valid one that points at those services.
    config = load_config(
        DEPLOY / "compose" / "triage-node.toml",
        environ={"TRIAGE_NODE_DATABASE_URL": "postgresql+psycopg://triage@postgres/triage"},
    )
    assert config.delivery.destinations == ["ORTHANC@orthanc:4242"]
    assert config.reconcile.pacs == "ORTHANC@orthanc:4242"
    assert config.dicom.port == 11112 and config.service.metrics_port == 9464


def test_dockerfile_copies_what_the_repository_has() -> None:
    root = DEPLOY.parent
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            *sources, _target = line.split()[1:]
            for source in sources:
                assert (root / source).exists(), source


@pytest.mark.parametrize("name", ["triage-node.example.toml", "compose/triage-node.toml"])
def test_shipped_configurations_load(name: str) -> None:
    assert load_config(DEPLOY / name, environ={}).source.endswith(name)
