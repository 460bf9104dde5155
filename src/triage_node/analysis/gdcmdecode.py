"""Decode one DICOM file's pixels with GDCM in a child process:
``python -m triage_node.analysis.gdcmdecode FILE`` writes ``<dtype> <rows> <columns>\\n`` and
the raw pixels to standard output.

GDCM is the last resort for streams pydicom's plugins turn down (12-bit JPEG Extended), and it is
native code reading untrusted data: a hostile stream has crashed it (SIGFPE). In a child process
such a crash costs only this decode; the worker refuses the image and analyses the rest.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np

TYPES = {"UINT8": np.uint8, "INT8": np.int8, "UINT16": np.uint16, "INT16": np.int16}
TIMEOUT_SECONDS = 60.0


def decode_in_child(path: str, rows: int, columns: int) -> np.ndarray:
    """The pixels of *path* as GDCM decodes them; ValueError when it cannot (or crashes)."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "triage_node.analysis.gdcmdecode", path],
            capture_output=True,
            timeout=TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ValueError(f"GDCM took longer than {TIMEOUT_SECONDS:.0f} s") from None
    if done.returncode < 0:
        raise ValueError(f"GDCM crashed (signal {-done.returncode})")
    if done.returncode != 0:
        raise ValueError(done.stderr.decode(errors="replace").strip()[-200:] or "GDCM failed")
    header, _, raw = done.stdout.partition(b"\n")
    scalar, height, width = header.decode().split()
    if (int(height), int(width)) != (rows, columns):
        raise ValueError("GDCM image size differs from Rows x Columns")
    pixels = np.frombuffer(raw, dtype=TYPES[scalar])
    if pixels.size < rows * columns:
        raise ValueError("GDCM returned fewer pixels than Rows x Columns")
    return pixels[: rows * columns].reshape(rows, columns)


def main(path: str) -> int:
    import gdcm  # type: ignore[import-untyped]

    gdcm.Trace.WarningOff()
    gdcm.Trace.ErrorOff()
    reader = gdcm.ImageReader()
    reader.SetFileName(path)
    if not reader.Read():
        print("GDCM cannot read the file", file=sys.stderr)
        return 1
    image = reader.GetImage()
    scalar = image.GetPixelFormat().GetScalarTypeAsString()
    if scalar not in TYPES or image.GetPixelFormat().GetSamplesPerPixel() != 1:
        print(f"GDCM gave {scalar} pixels", file=sys.stderr)
        return 1
    raw = image.GetBuffer().encode("utf-8", "surrogateescape")  # python-gdcm returns str
    out = sys.stdout.buffer
    out.write(f"{scalar} {image.GetDimension(1)} {image.GetDimension(0)}\n".encode())
    out.write(raw)
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
