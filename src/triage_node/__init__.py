"""triage-node: a PACS-integrated DICOM node for radiograph worklist triage."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("triage-node")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
