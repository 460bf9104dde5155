"""Images of a labelled folder as the network sees them: [0, 1] float32, bone bright.

JPEG and PNG files (8- or 16-bit grayscale, or RGB converted to luminance) are scaled by their bit
depth; DICOM files go through the same grayscale pipeline as received instances
(:func:`triage_node.analysis.preprocess.windowed_image`). From there training, evaluation and
the runtime share :func:`triage_node.analysis.preprocess.model_input`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError

from triage_node.analysis.preprocess import WindowPolicy, windowed_image
from triage_node.errors import DatasetFolderError, PreprocessRefused

Image.MAX_IMAGE_PIXELS = 16384 * 16384  # the same ceiling as preprocess.MAX_ROWS x MAX_COLUMNS


def _picture(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        image.load()  # truncated files raise here unless LOAD_TRUNCATED_IMAGES is set
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(image, dtype=np.float32)
            scale = np.float32(65535 if image.mode != "I" else max(float(arr.max()), 1.0))
            return np.asarray(np.clip(arr / scale, 0, 1), dtype=np.float32)
        return np.asarray(image.convert("L"), dtype=np.float32) / np.float32(255)


def read_display(path: Path, windowing: WindowPolicy = "header") -> np.ndarray:
    """One image file as a (rows, columns) float32 array in [0, 1]."""
    try:
        if path.suffix.lower() == ".dcm":
            return windowed_image(pydicom.dcmread(path), windowing)
        return _picture(path)
    except (OSError, UnidentifiedImageError, InvalidDicomError, PreprocessRefused) as exc:
        raise DatasetFolderError(f"{path}: cannot be read as an image: {exc}") from None
