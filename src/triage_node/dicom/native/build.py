"""The DCMTK transport's program (``dcmtk_receiver.cpp``): found, or compiled once.

The source ships inside the package; the program is compiled against the system's DCMTK
(Debian/Ubuntu: ``g++`` and ``libdcmtk-dev``) the first time a node with ``dicom.transport =
"dcmtk"`` starts, into the installation's ``libexec/triage-node`` when that is writable (a
virtual environment), else into the data directory. Its name carries a digest of the source,
so an upgraded package builds its own program and never runs an older one.
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
