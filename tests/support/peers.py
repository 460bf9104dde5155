"""Real peers on loopback: DCMTK tools, free ports, and the installed triage-node command."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from pydicom import dcmread

IN_CI = os.environ.get("CI", "").lower() == "true"
REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
DICOM_DIR = SHARED / "data" / "dicom"

# storescu option that proposes exactly one file's transfer syntax, so DCMTK sends the
# dataset as it is stored instead of converting it.
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.57": "-xs",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


def missing(what: str, hint: str) -> None:
    """Skip (or, in CI, fail) a test whose real peer is not installed."""
    message = f"{what} is not available ({hint})"
    if IN_CI:
        pytest.fail(f"{message}; CI must provide it")
    pytest.skip(message)


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(name, f"apt-get install {package}")
    return str(path)


def require_dcmtk_transport() -> Path:
    """The DCMTK transport's program (``dicom.transport = "dcmtk"``), built once into this
    virtual environment where the node under test finds it; skips (fails in CI) when it
    cannot be built here."""
    from triage_node.dicom.native.build import ensure_program
    from triage_node.errors import TriageError

    try:
        return ensure_program(Path(tempfile.gettempdir()) / "triage-node-tests")
    except TriageError as exc:
        missing(f"the DCMTK transport ({exc})", "apt-get install g++ libdcmtk-dev")
    raise AssertionError("unreachable")


TRANSPORTS = ("pynetdicom", "dcmtk")  # dicom.transport


def transport_settings(transport: str) -> dict[str, str]:
    """The ``[dicom]`` settings of a node on *transport* (the DCMTK one built first)."""
    if transport == "dcmtk":
        require_dcmtk_transport()
    return {"transport": transport}


def require_shared_dicom() -> Path:
    if not DICOM_DIR.is_dir():
        pytest.skip(f"shared DICOM samples not found at {DICOM_DIR}")
    return DICOM_DIR


def triage_node_command() -> str:
    """The installed console script next to this interpreter."""
    command = Path(sys.executable).parent / "triage-node"
    if not command.exists():
        missing("the installed triage-node command", "run the tests through 'make test'")
    return str(command)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dcmtk_env() -> dict[str, str]:
    """DCMTK leaves Nagle on unless told (perf-notes.md)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def storescu(
    port: int, files: list[Path], *extra: str, called: str = "TRIAGE_NODE", timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    command = [
        require_tool("storescu", "dcmtk"),
        "-v",
        "-aec",
        called,
        *extra,
        "127.0.0.1",
        str(port),
        *map(str, files),
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=dcmtk_env(), check=False
    )


def storescu_process(
    port: int, files: list[Path], called: str = "TRIAGE_NODE"
) -> subprocess.Popen[str]:
    """``storescu -v`` sending *files* in one association, running; its output (stdout and
    stderr together) tells which were acknowledged (see :func:`acknowledged`)."""
    return subprocess.Popen(
        [require_tool("storescu", "dcmtk"), "-v", "-aec", called, "127.0.0.1", str(port)]
        + [str(f) for f in files],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dcmtk_env(),
    )


def transfer_syntax_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a DICOM file: everything after the File Meta Information."""
    data = path.read_bytes()
    if data[128:132] != b"DICM":
        raise ValueError(f"{path} has no DICOM preamble")
    # (0002,0000) File Meta Information Group Length: explicit VR LE, UL, value at offset 140.
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length :]


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class StoreSCP:
    """DCMTK ``storescp`` in bit-preserving mode: the reference for what storescu sent."""

    def __init__(self, directory: Path, *extra: str, port: int | None = None) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):  # a free port can be taken by another test before storescp binds
            self.port = port or free_port()
            self.process = subprocess.Popen(
                [require_tool("storescp", "dcmtk"), *extra, "-od", str(directory), str(self.port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=dcmtk_env(),
            )
            try:
                wait_for(self._listening_or_exited, 60, what="storescp to listen")
            except AssertionError:
                self.stop()
                raise
            if self.process.poll() is None:
                return
            if port is not None or attempt == 2:
                raise AssertionError(f"storescp exited with {self.process.returncode}")

    def _listening_or_exited(self) -> bool:
        return self.process.poll() is not None or self._listening()

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def dciodvfy_errors(path: Path) -> list[str]:
    """The Error lines dicom3tools' dciodvfy prints for a DICOM file (warnings left out)."""
    result = subprocess.run(
        [require_tool("dciodvfy", "dicom3tools"), str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    return [line for line in result.stderr.splitlines() if line.startswith("Error")]


PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")


_VALIDATE_SR = Path(__file__).with_name("java") / "ValidateSR.java"
_JAVA_OPTIONS = [
    # Recent Java refuses PixelMed's XSLT without the three XPath limits lifted.
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
    "-XX:TieredStopAtLevel=1",  # a short run: the quick compiler only
]


def sr_validator_findings(path: Path) -> list[str]:
    """The Error and Warning lines of PixelMed's template-aware ``DicomSRValidator`` for an SR
    (or Key Object Selection) file."""
    return sr_validator_findings_each([path])[path]


def sr_validator_findings_each(paths: list[Path]) -> dict[Path, list[str]]:
    """``sr_validator_findings`` for several files, by one validator in one JVM where the JDK's
    source launcher is there (the validator compiles its stylesheets once: about 1 s a file
    instead of 4-5), else by ``DicomSRValidator``'s own command, a JVM per file."""
    java = require_tool("java", "pixelmed-apps")
    if not PIXELMED_JAR.is_file():
        missing(str(PIXELMED_JAR), "apt-get install pixelmed-apps")
    if not paths:
        return {}
    command = [java, *_JAVA_OPTIONS, "-cp", str(PIXELMED_JAR)]
    if shutil.which("javac"):  # the JDK: its source launcher runs ValidateSR.java
        result = _run_java([*command, str(_VALIDATE_SR), *map(str, paths)], len(paths))
        outputs = result.split("==== ")[1:]
        assert len(outputs) == len(paths), result[-2000:]
        found = {}
        for path, output in zip(paths, outputs, strict=True):
            named, _, text = output.partition("\n")
            assert named == str(path), (named, path)
            found[path] = _findings(text)
        return found
    validator = [*command, "com.pixelmed.validate.DicomSRValidator"]
    return {path: _findings(_run_java([*validator, str(path)], 1)) for path in paths}


def _run_java(command: list[str], files: int) -> str:
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120 + 30 * files, check=False
    )
    return result.stdout + result.stderr


def _findings(output: str) -> list[str]:
    assert "Root Template Validation Complete" in output or "IOD validation complete" in output, (
        output[-2000:]
    )
    return [line for line in output.splitlines() if line.startswith(("Error", "Warning"))]


SENT = re.compile(r"Sending file: (\S+)")
RESPONSE = re.compile(r"Received Store Response \(([^)]*)\)")


def acknowledged(storescu_output: str) -> list[Path]:
    """Files for which storescu printed a Success response, in order."""
    done, current = [], None
    for line in storescu_output.splitlines():
        if match := SENT.search(line):
            current = Path(match.group(1))
        elif (match := RESPONSE.search(line)) and current is not None:
            if match.group(1) == "Success":
                done.append(current)
            current = None
    return done
