"""triage-node: a PACS-integrated DICOM node for radiograph worklist triage."""

import os
from importlib.metadata import PackageNotFoundError, version

# ONNX Runtime's Linux wheels (1.32 and later) start Microsoft's usage telemetry when the library
# loads: a device id and an event cache under ~/.cache/Microsoft/DeveloperTools, uploaded to
# Microsoft's collector. A node in a hospital network sends nothing anywhere it was not told to,
# so it is switched off here, before any module of the node can import onnxruntime (the child
# processes inherit the setting). An administrator who wants it sets ORT_DISABLE_TELEMETRY=0.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

try:
    __version__ = version("triage-node")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
