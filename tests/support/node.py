"""Run the installed ``triage-node serve`` as a real subprocess for integration tests."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import jsonschema
from sqlalchemy import create_engine, text

from tests.support.peers import free_port, triage_node_command
from triage_node.dicom.echo_scu import echo_listener

STATUS_SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "docs" / "status.schema.json").read_text()
)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def echo_ok(port: int, called: str = "TRIAGE_NODE") -> bool:
    """True when the node answers C-ECHO with Success (the check ``status`` makes).

    While a node starts or restarts, pynetdicom's connection can be refused; pynetdicom then
    drops its socket unclosed (pyproject.toml's filter) and, when an exception's traceback keeps
    it in a reference cycle, the garbage collector finalises it later, inside whatever test runs
    then, where the module filter no longer applies. Collect it here instead.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "unclosed <socket", ResourceWarning)
        try:
            answer = echo_listener("127.0.0.1", port, called, timeout=2)
        finally:
            gc.collect()
    return answer["detail"] == "C-ECHO success"


def process_group_members(group: int) -> list[int]:
    """Live (not zombie) processes of a process group: a started node's is its supervisor's
    pid (it runs in its own session)."""
    members = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == group:
            members.append(int(entry.name))
    return members


class Node:
    """One triage-node service with its own data directory, database and port."""

    def __init__(self, workdir: Path, database_url: str = "", **sections: dict[str, Any]) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.data_dir = workdir / "data"
        base: dict[str, dict[str, Any]] = {
            # each test names its transport: the default ("auto") depends on the machine
            "dicom": {
                "port": self.port,
                "bind": "127.0.0.1",
                "receivers": 2,
                "transport": "pynetdicom",
            },
            "storage": {"data_dir": str(self.data_dir), "min_free_mb": 16},
            "study": {"settle_seconds": 0.5},
            "service": {"poll_seconds": 0.1, "heartbeat_seconds": 1, "shutdown_grace_seconds": 10},
            "log": {"format": "json", "level": "DEBUG"},
            "worker": {"count": 0},
        }
        if database_url:
            base["database"] = {"url": database_url}
        for name, values in sections.items():
            base.setdefault(name, {}).update(values)
        self.sections = base
        self.data_dir = Path(base["storage"]["data_dir"])  # the sections may name another
        self.config_path = write_config(workdir / "triage-node.toml", base)
        self.log_path = workdir / "serve.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_NODE_")}

    def rewrite_config(self) -> None:
        """Write ``self.sections`` again (after changing them, before ``start``)."""
        self.config_path = write_config(self.workdir / "triage-node.toml", self.sections)

    @property
    def spool(self) -> Path:
        return self.data_dir / "spool"

    @property
    def database_url(self) -> str:
        return str(
            self.sections.get("database", {}).get("url")
            or f"sqlite:///{self.data_dir / 'triage-node.sqlite3'}"
        )

    def command(
        self, *args: str, timeout: float = 60, input_text: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [triage_node_command(), "--config", str(self.config_path), *args],
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            check=False,
        )

    def start(self, timeout: float = 30, expect_echo: bool = True) -> Node:
        """Start and wait until it answers C-ECHO (or, when loopback is not allowed, until
        every receiver logged that it is ready)."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.process = subprocess.Popen(
            [triage_node_command(), "--config", str(self.config_path), "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"triage-node exited early:\n{self.log()}")
            if expect_echo and echo_ok(
                self.port, self.sections["dicom"].get("ae_title", "TRIAGE_NODE")
            ):
                return self
            ready = [r for r in self.log_records() if r.get("action") == "receiver_started"]
            if not expect_echo and len(ready) >= self.sections["dicom"]["receivers"]:
                return self
            time.sleep(0.2)
        raise AssertionError(f"triage-node did not answer C-ECHO in {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, as systemd would; returns the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self.process = None
        return code

    def kill(self) -> None:
        """SIGKILL the whole service (supervisor and receivers), like a power cut of the box."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)
        self.process = None

    def status(self) -> tuple[int, dict[str, Any]]:
        """``triage-node status --json``: exit status and report, checked against its schema."""
        result = self.command("status", "--json")
        report = json.loads(result.stdout)
        jsonschema.validate(report, STATUS_SCHEMA)
        return result.returncode, report

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def sql(self, query: str, **params: Any) -> list[dict[str, Any]]:
        """Rows of a read-only query on the node's database, as dicts."""
        engine = create_engine(self.database_url)
        try:
            with engine.connect() as conn:
                return [dict(r._mapping) for r in conn.execute(text(query), params)]
        finally:
            engine.dispose()

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                records.append(json.loads(line))
        return records
