"""Thumbnails for the study page, rendered by the node from its spool and kept in memory.

The source image is windowed exactly as the model saw it (``analysis.preprocess``), the heatmap
is the Secondary Capture the node sent to the PACS; both are scaled to at most ``SIDE`` pixels
and encoded as PNG. A file that cannot be rendered gives None, never an error page.
"""

from __future__ import annotations

import collections
import io
import threading
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread

from triage_node.analysis.preprocess import windowed_image
from triage_node.logs import get_logger

LOG = get_logger(__name__)

SIDE = 512


def _png(picture: Image.Image) -> bytes:
    picture.thumbnail((SIDE, SIDE), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    picture.save(out, format="PNG", optimize=False)
    return out.getvalue()


def render_source(path: Path) -> bytes | None:
    """The radiograph, windowed and bone-bright, as a PNG thumbnail."""
    try:
        display = windowed_image(dcmread(path))
        pixels = (np.clip(np.nan_to_num(display), 0, 1) * 255).astype(np.uint8)
        return _png(Image.fromarray(pixels, mode="L"))
    except Exception:  # any file the spool holds: a thumbnail is not worth an error page
        LOG.warning("cannot render a source thumbnail", exc_info=True)
        return None


def render_capture(path: Path) -> bytes | None:
    """A Secondary Capture (the node's own heatmap, RGB) as a PNG thumbnail."""
    try:
        ds = dcmread(path)
        pixels = np.asarray(ds.pixel_array, dtype=np.uint8)
        mode = "RGB" if pixels.ndim == 3 else "L"
        return _png(Image.fromarray(pixels, mode=mode))
    except Exception:  # any file the spool holds: a thumbnail is not worth an error page
        LOG.warning("cannot render a heatmap thumbnail", exc_info=True)
        return None


def captured_source(path: Path) -> str | None:
    """The SOP Instance UID of the image a heatmap capture was made from."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SourceImageSequence"])
        return str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
    except Exception:  # a capture the node did not make, or a file gone
        return None


class ThumbnailCache:
    """Least recently used PNGs up to a number of bytes. Thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: str, png: bytes) -> None:
        if len(png) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = png
            self._bytes += len(png)
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)
