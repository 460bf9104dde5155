"""From a stored radiograph to the model's input: pure ``(array, dataset) -> array`` steps.

In the order PS3.4 Annex N (the grayscale pipeline) requires: decode, Modality LUT, VOI LUT,
presentation (MONOCHROME1 / Presentation LUT Shape INVERSE, so bone is bright), then resize to
the model's input and normalise. Size limits are checked before any pixel is allocated, and each
refusal is a :class:`PreprocessRefused` with a reason, never a crash.

A large radiograph is windowed and area-reduced in :data:`BANDS` horizontal bands side by side
(numpy and Pillow release the GIL): every step before the resize is per pixel, and the bands of
the integer reduction never share an input pixel, so the result is the same, bit for bit, as one
pass over the whole image (tested), in about half the time on two cores.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.pixels.utils import pixel_array

from triage_node.analysis.gdcmdecode import decode_in_child
from triage_node.errors import PreprocessRefused

MAX_ROWS = MAX_COLUMNS = 16384
MAX_PIXEL_BYTES = 512 * 2**20
PERCENTILE_WINDOW = (0.5, 99.5)  # robust window for images whose header has none
BANDS = 2  # horizontal bands of a large image processed side by side
BANDED_PIXELS = 512 * 512  # images smaller than this are processed in one piece
REDUCING_GAP = 2.0  # Pillow's: box-reduce by an integer factor first, leaving at least 2x to go
T = TypeVar("T")

ResizeMode = Literal["letterbox", "stretch"]
WindowPolicy = Literal["header", "percentile"]


@dataclass(frozen=True, slots=True)
class InputSpec:
    """What the model expects (from its manifest)."""

    size: int
    channels: int = 1
    mean: float = 0.5
    std: float = 0.25
    resize: ResizeMode = "letterbox"
    windowing: WindowPolicy = "header"


@dataclass(frozen=True, slots=True)
class Geometry:
    """How the image sits in the model input: scale and padding (to map the CAM back)."""

    rows: int
    columns: int
    scale_y: float
    scale_x: float
    pad_top: int
    pad_left: int

    def window_in(self, height: int, width: int, size: int) -> tuple[float, float, float, float]:
        """Where the image (not the padding) lies in an (height, width) map of a size x size
        input, such as a CAM: (top, left, bottom, right) in that map's cells."""
        sy, sx = height / size, width / size
        return (
            self.pad_top * sy,
            self.pad_left * sx,
            (self.pad_top + self.rows * self.scale_y) * sy,
            (self.pad_left + self.columns * self.scale_x) * sx,
        )


@dataclass(frozen=True, slots=True)
class Preprocessed:
    tensor: np.ndarray  # (channels, size, size) float32, normalised
    display: np.ndarray  # (rows, columns) float32 in [0, 1], bone bright: for heatmaps
    geometry: Geometry


def check_limits(ds: Dataset) -> None:
    """Refuse what the model cannot use, or what would need absurd memory, before decoding."""
    try:
        _check_limits(ds)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:  # unreadable header values
        raise PreprocessRefused(f"invalid image header: {type(exc).__name__}") from exc


def _check_limits(ds: Dataset) -> None:
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise PreprocessRefused("no Pixel Data")
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if not (0 < rows <= MAX_ROWS and 0 < columns <= MAX_COLUMNS):
        raise PreprocessRefused(f"Rows x Columns {rows} x {columns} outside 1..{MAX_ROWS}")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise PreprocessRefused(f"{frames} frames; only single-frame radiographs are analysed")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise PreprocessRefused("not a grayscale image (Samples per Pixel is not 1)")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise PreprocessRefused(f"Photometric Interpretation {photometric or 'missing'}")
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if bits not in (8, 16, 32):
        raise PreprocessRefused(f"Bits Allocated {bits} is not 8, 16 or 32")
    stored = int(ds.get("BitsStored", bits) or bits)
    if not 1 <= stored <= bits:
        raise PreprocessRefused(f"Bits Stored {stored} does not fit Bits Allocated {bits}")
    if rows * columns * bits // 8 > MAX_PIXEL_BYTES:
        raise PreprocessRefused("image larger than the pixel memory limit")
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None:
        raise PreprocessRefused("no Transfer Syntax UID in the File Meta Information")
    if not syntax.is_compressed and "PixelData" in ds:
        expected = rows * columns * bits // 8
        if len(ds.PixelData) < expected:
            raise PreprocessRefused(
                f"Pixel Data holds {len(ds.PixelData)} bytes, Rows x Columns need {expected}"
            )


def decode(ds: Dataset) -> np.ndarray:
    """Decode the pixels: pydicom's plugins (pylibjpeg, then GDCM), then GDCM on the file itself,
    which also reads streams pydicom's GDCM plugin turns down (12-bit JPEG Extended)."""
    errors = []
    for plugin in ("", "gdcm"):
        try:
            return np.asarray(pixel_array(ds, decoding_plugin=plugin))
        except Exception as exc:  # decoders raise many types for broken streams
            errors.append(f"{plugin or 'default'}: {type(exc).__name__}: {str(exc)[:120]}")
    if isinstance(ds.filename, str) and ds.filename:
        try:
            return decode_in_child(ds.filename, int(ds.Rows), int(ds.Columns))
        except Exception as exc:
            errors.append(f"gdcm file: {str(exc)[:120]}")
    raise PreprocessRefused("cannot decode Pixel Data (" + "; ".join(errors) + ")")


def apply_modality(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality LUT (PS3.3 C.11.1): Rescale Slope/Intercept, or the Modality LUT Sequence.

    An identity rescale returns the stored values as they are (no float copy: the VOI step
    converts once; on a 2000x2500 image each float32 copy costs ~5 ms here).
    """
    if "ModalityLUTSequence" in ds:
        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        raise ValueError(f"Rescale Slope {slope} / Intercept {intercept} is not a number")
    if slope == 1 and intercept == 0:
        return arr
    out = arr.astype(np.float32)
    if slope != 1:
        out *= np.float32(slope)
    if intercept != 0:
        out += np.float32(intercept)
    if _largest_magnitude(arr) * abs(slope) + abs(intercept) > np.finfo(np.float32).max:
        raise ValueError(f"Rescale Slope {slope} / Intercept {intercept} overflows")
    return out


def _largest_magnitude(arr: np.ndarray) -> float:
    """The largest |value| the array's type can hold (no pass over the pixels), or that it
    holds, for floating-point pixels."""
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        return float(max(abs(int(info.min)), int(info.max)))
    return float(np.nanmax(np.abs(arr))) if arr.size else 0.0


def _first(value: object) -> float:
    """The first of a multi-valued DS (several windows may be offered; the first is the default)."""
    if isinstance(value, MultiValue | list | tuple):
        return float(value[0])
    return float(value)  # type: ignore[arg-type]


VOISource = Literal["lut", "window", "percentile"]


def voi_source(ds: Dataset, policy: WindowPolicy = "header") -> VOISource:
    """Which VOI step :func:`apply_voi` takes for *ds*: its VOI LUT Sequence, its first usable
    Window Center/Width pair, or a percentile window of the image itself."""
    if policy == "header" and "VOILUTSequence" in ds:
        return "lut"
    if policy == "header" and "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        usable = math.isfinite(center) and math.isfinite(width)  # else: as if there were none
        if usable and width > 0 and not (function == "LINEAR" and width < 1):
            return "window"
    return "percentile"


def _per_pixel(ds: Dataset, policy: WindowPolicy) -> bool:
    """Whether the VOI step maps each pixel on its own (so bands give the same result): not for
    a percentile window, nor for a VOI LUT whose top is read from the image."""
    source = voi_source(ds, policy)
    if source == "lut":
        return isinstance(ds.VOILUTSequence[0].LUTData, MultiValue | list)
    return source == "window"


def apply_voi(
    arr: np.ndarray, ds: Dataset, policy: WindowPolicy = "header", out: np.ndarray | None = None
) -> np.ndarray:
    """VOI LUT (PS3.3 C.11.2) to [0, 1]: VOI LUT Sequence, else the first Window Center/Width
    pair (LINEAR, LINEAR_EXACT or SIGMOID), else a robust percentile window.

    With *out* (float32, the shape of *arr*) a window is written there in its own passes, with
    no temporary the size of the image; the other sources are computed and then copied in.
    """
    source = voi_source(ds, policy)
    if source == "window":
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        return window(arr, _first(ds.WindowCenter), _first(ds.WindowWidth), function, out)
    if out is not None:
        out[...] = apply_voi(arr, ds, policy)
        return out
    if source == "lut":
        mapped = np.asarray(apply_voi_lut(arr, ds, prefer_lut=True), dtype=np.float32)
        lut_data = ds.VOILUTSequence[0].LUTData
        listed = isinstance(lut_data, MultiValue | list)
        top = float(max(lut_data)) if listed else float(mapped.max())
        if top <= 0:
            return np.zeros_like(mapped)
        return np.asarray(np.clip(mapped / top, 0, 1), dtype=np.float32)
    low, high = np.percentile(arr, PERCENTILE_WINDOW)
    if high <= low:
        return np.zeros_like(arr, dtype=np.float32)
    scaled = (arr - np.float32(low)) / np.float32(high - low)
    return np.asarray(np.clip(scaled, 0, 1), dtype=np.float32)


def window(
    arr: np.ndarray,
    center: float,
    width: float,
    function: str = "LINEAR",
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Window to [0, 1] as PS3.3 C.11.2.1.2 defines it, in float32, into *out* when given.

    LINEAR and LINEAR_EXACT are one affine map, ``x * scale + bias`` then a clip: the multiply
    converts to float32 in the same pass (three passes over the pixels instead of five; on a
    2000x2500 image about 2.6 ms instead of 3.9 here, equal to 6e-8).
    """
    if function == "SIGMOID":
        x: np.ndarray = np.subtract(arr, np.float32(center), out=out, dtype=np.float32)
        x *= np.float32(-4.0 / width)
        np.exp(x, out=x)
        x += np.float32(1)
        np.reciprocal(x, out=x)
        return x
    if function == "LINEAR_EXACT":
        scale, bias = 1.0 / width, 0.5 - center / width
    else:
        if width <= 1:
            above = arr > np.float32(center - 0.5)
            if out is None:
                return above.astype(np.float32)
            out[...] = above
            return out
        scale, bias = 1.0 / (width - 1), 0.5 - (center - 0.5) / (width - 1)
    x = np.multiply(arr, np.float32(scale), out=out, dtype=np.float32)
    x += np.float32(bias)
    clipped: np.ndarray = np.clip(x, 0, 1, out=x)
    return clipped


def apply_presentation(arr: np.ndarray, ds: Dataset, in_place: bool = False) -> np.ndarray:
    """Make bone bright: invert MONOCHROME1, and Presentation LUT Shape INVERSE (in *arr*
    itself when *in_place*)."""
    inverted = str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1"
    if str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE":
        inverted = not inverted
    if not inverted:
        return arr
    inverse: np.ndarray = np.subtract(np.float32(1), arr, out=arr if in_place else None)
    return inverse


def resize(
    arr: np.ndarray, size: int, mode: ResizeMode = "letterbox"
) -> tuple[np.ndarray, Geometry]:
    """Area-average resize into a size x size square; letterbox keeps the aspect ratio.

    What Pillow's ``resize(BOX, reducing_gap=2.0)`` does — box-reduce by an integer factor,
    then box-resample the rest (half the time of one exact BOX pass at these sizes, still an
    area average) — with the reduction done in bands side by side.
    """
    rows, columns = arr.shape
    if mode == "stretch":
        new_h, new_w = size, size
    else:
        scale = size / max(rows, columns)
        new_h, new_w = max(1, round(rows * scale)), max(1, round(columns * scale))
    pixels = np.ascontiguousarray(arr, dtype=np.float32)
    factor_x = int(columns / new_w / REDUCING_GAP) or 1
    factor_y = int(rows / new_h / REDUCING_GAP) or 1
    image, box = pixels, (0.0, 0.0, float(columns), float(rows))
    if factor_x > 1 or factor_y > 1:
        parts = bands(rows, factor_y) if pixels.size >= BANDED_PIXELS else [slice(0, rows)]
        image = np.concatenate(
            side_by_side(lambda band: _reduce(pixels[band], factor_x, factor_y), parts)
        )
        box = (0.0, 0.0, columns / factor_x, rows / factor_y)
    small = np.asarray(
        Image.fromarray(image, mode="F").resize((new_w, new_h), Image.Resampling.BOX, box=box),
        dtype=np.float32,
    )
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = small
    geometry = Geometry(rows, columns, new_h / rows, new_w / columns, top, left)
    return out, geometry


def _reduce(arr: np.ndarray, factor_x: int, factor_y: int) -> np.ndarray:
    """Pillow's box reduction: the mean of each factor_x x factor_y block (the last, partial
    blocks of a row or column average the pixels they have)."""
    image = Image.fromarray(np.ascontiguousarray(arr), mode="F")
    return np.asarray(image.reduce((factor_x, factor_y)), dtype=np.float32)


def bands(rows: int, multiple: int = 1) -> list[slice]:
    """Up to :data:`BANDS` row ranges covering *rows*, each but the last a multiple of
    *multiple* rows long (so a reduction by that factor never straddles two)."""
    step = max(multiple, (rows // BANDS) // multiple * multiple)
    starts = list(range(0, rows, step))[:BANDS]
    ends = [*starts[1:], rows]
    return [slice(start, end) for start, end in zip(starts, ends, strict=True)]


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def side_by_side(work: Callable[[slice], T], parts: list[slice]) -> list[T]:
    """``[work(part) for part in parts]``, the parts in threads (made on first use)."""
    global _pool
    if len(parts) == 1:
        return [work(parts[0])]
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=BANDS, thread_name_prefix="preprocess")
    return list(_pool.map(work, parts))


def normalise(arr: np.ndarray, spec: InputSpec) -> np.ndarray:
    out = (arr - np.float32(spec.mean)) / np.float32(spec.std)
    return np.repeat(out[None, :, :], spec.channels, axis=0).astype(np.float32)


def windowed_image(ds: Dataset, policy: WindowPolicy = "header") -> np.ndarray:
    """Decode and apply the grayscale pipeline: (rows, columns) float32 in [0, 1], bone bright."""
    check_limits(ds)
    arr = decode(ds)
    if arr.shape != (int(ds.Rows), int(ds.Columns)):
        raise PreprocessRefused(f"decoded pixels have shape {arr.shape}, not Rows x Columns")
    try:
        if arr.size < BANDED_PIXELS or not _per_pixel(ds, policy):
            return _grayscale(arr, ds, policy)
        display = np.empty(arr.shape, dtype=np.float32)

        def window_band(band: slice) -> None:
            _grayscale(arr[band], ds, policy, out=display[band])

        side_by_side(window_band, bands(arr.shape[0]))
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise PreprocessRefused(f"invalid LUT or window in the header: {exc}") from exc
    return display


def _grayscale(
    arr: np.ndarray, ds: Dataset, policy: WindowPolicy, out: np.ndarray | None = None
) -> np.ndarray:
    """The per-pixel chain; with *out*, written there (a band of the display image) without a
    temporary image and a copy: on a 2000x2500 radiograph that copy cost about 2 ms."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        voi = apply_voi(apply_modality(arr, ds), ds, policy, out)
        return apply_presentation(voi, ds, in_place=out is not None)


def model_input(display: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, Geometry]:
    """From a [0, 1] bone-bright image to the model's input: resize and normalise.

    Training calls this very function on its images (JPEG/PNG scaled to [0, 1]), so the network
    sees the same input at run time as it learned from.
    """
    resized, geometry = resize(display, spec.size, spec.resize)
    return normalise(resized, spec), geometry


def preprocess(ds: Dataset, spec: InputSpec) -> Preprocessed:
    """The whole chain for one image."""
    display = windowed_image(ds, spec.windowing)
    tensor, geometry = model_input(display, spec)
    # The last guard, on the small model input (the area resize carries any NaN or inf along):
    # what the model sees is always a number, so its probability is one.
    if not np.isfinite(tensor).all():
        raise PreprocessRefused("the header's rescale or window gives non-finite pixel values")
    return Preprocessed(tensor, display, geometry)
