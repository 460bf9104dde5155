"""The DCMTK transport's program (``dcmtk_receiver.cpp``): found, or compiled once.

The source ships inside the package; the program is compiled against the system's DCMTK
(Debian/Ubuntu: ``g++`` and ``libdcmtk-dev``) the first time a node with ``dicom.transport =
"dcmtk"`` starts (or ``"auto"``, the default, on a system that has both: :func:`available`),
into the installation's ``libexec/triage-node`` when that is writable (a virtual environment),
else into the data directory. Its name carries a digest of the source, so an upgraded package
builds its own program and never runs an older one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from triage_node.errors import TriageError

SOURCE = Path(__file__).with_name("dcmtk_receiver.cpp")
LIBRARIES = ("-ldcmnet", "-ldcmdata", "-loflog", "-lofstd", "-lpthread")
_HEADER = Path("/usr/include/dcmtk/dcmnet/scpthrd.h")  # Debian's libdcmtk-dev
_PACKAGES = "apt-get install g++ libdcmtk-dev"


def program_name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    return f"dcmtk-receiver-{digest}"


def program_places(data_dir: Path) -> list[Path]:
    """Where the program is looked for, and built, in this order."""
    return [
        Path(sys.prefix) / "libexec" / "triage-node" / program_name(),
        data_dir / "native" / program_name(),
    ]


def find_program(data_dir: Path) -> Path | None:
    for place in program_places(data_dir):
        if os.access(place, os.X_OK):
            return place
    return None


def build_program(target: Path) -> Path:
    """Compile the program into *target* (atomically: a half-written program is never
    there). Raises TriageError saying what is missing when it cannot be built."""
    compiler = shutil.which("g++")
    if compiler is None:
        raise TriageError(
            f'dicom.transport = "dcmtk" needs a C++ compiler to build its receiver: {_PACKAGES} '
            '(or set dicom.transport = "pynetdicom")'
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        built = Path(tmp) / target.name
        command = [compiler, "-O2", "-std=c++17", str(SOURCE), "-o", str(built), *LIBRARIES]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            missing = "" if _HEADER.exists() else f" (DCMTK's headers are missing: {_PACKAGES})"
            detail = result.stderr.strip().splitlines()[-1:] or ["no output"]
            raise TriageError(f"could not build the DCMTK receiver{missing}: {detail[0]}") from None
        built.chmod(0o755)
        built.replace(target)
    return target


def ensure_program(data_dir: Path) -> Path:
    """The program, built into the first writable place when it is not there yet."""
    found = find_program(data_dir)
    if found is not None:
        return found
    for place in program_places(data_dir):
        try:
            place.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(place.parent, os.W_OK):
            return build_program(place)
    raise TriageError(
        "no writable place to build the DCMTK receiver: "
        + ", ".join(str(p.parent) for p in program_places(data_dir))
    )


def available(data_dir: Path) -> tuple[Path | None, str]:
    """For ``dicom.transport = "auto"``: the program, found or built where the system has what
    building it needs, and checked to start; else None and why not (for the log)."""
    program = find_program(data_dir)
    if program is None:
        if shutil.which("g++") is None:
            return None, f"no C++ compiler to build DCMTK's receiver ({_PACKAGES})"
        if not _HEADER.exists():
            return None, f"DCMTK's headers are missing ({_PACKAGES})"
        try:
            program = ensure_program(data_dir)
        except TriageError as exc:
            return None, str(exc)
    problem = starts(program)
    if problem is not None:
        return None, problem
    return program, ""


def starts(program: Path) -> str | None:
    """None when *program* starts (without arguments it prints its usage and exits with 2);
    else what is wrong, such as a DCMTK library gone since it was built."""
    try:
        result = subprocess.run(
            [str(program)], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"the DCMTK receiver does not start: {exc}"
    if result.returncode != 2 or "usage:" not in result.stderr:
        detail = result.stderr.strip().splitlines()[-1:] or [f"exit status {result.returncode}"]
        return f"the DCMTK receiver does not start: {detail[0][:200]}"
    return None
