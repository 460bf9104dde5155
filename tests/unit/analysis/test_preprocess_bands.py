"""Large images are windowed and reduced in bands side by side: the same result, bit for bit,
as one pass over the whole image (Pillow's own reducing resize, the per-pixel chain)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from tests.support.synth import radiograph
from triage_node.analysis import preprocess as preprocessing
from triage_node.analysis.preprocess import bands, resize, windowed_image


def pillow_resize(arr: np.ndarray, size: int, mode: str) -> np.ndarray:
    """The reference: one Pillow call on the whole image, as the node did before bands."""
    rows, columns = arr.shape
    if mode == "stretch":
        new_h = new_w = size
    else:
        scale = size / max(rows, columns)
        new_h, new_w = max(1, round(rows * scale)), max(1, round(columns * scale))
    image = Image.fromarray(arr, mode="F")
    small = np.asarray(image.resize((new_w, new_h), Image.Resampling.BOX, reducing_gap=2.0))
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = small
    return out


@pytest.mark.parametrize(
    ("rows", "columns"),
    [(2500, 2000), (2501, 1999), (1000, 3000), (3071, 2047), (777, 778), (384, 300), (100, 60)],
)
@pytest.mark.parametrize("mode", ["letterbox", "stretch"])
def test_banded_resize_is_pillows_reducing_resize(rows: int, columns: int, mode: str) -> None:
    arr = np.random.default_rng(rows).random((rows, columns), dtype=np.float32)
    ours, geometry = resize(arr, 384, mode)  # type: ignore[arg-type]
    np.testing.assert_array_equal(ours, pillow_resize(arr, 384, mode))
    assert (geometry.rows, geometry.columns) == (rows, columns)


def test_bands_cover_the_rows_on_the_reduction_grid() -> None:
    for rows in (1, 2, 5, 999, 2500, 2501):
        for multiple in (1, 3, 6, 7):
            parts = bands(rows, multiple)
            assert len(parts) <= preprocessing.BANDS
            assert parts[0].start == 0 and parts[-1].stop == rows
            for before, after in itertools.pairwise(parts):
                assert before.stop == after.start and before.start % multiple == 0
                assert (before.stop - before.start) % multiple == 0


def with_voi_lut(ds: Dataset) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = [min(65535, (value * 16) ** 2 // 65536) for value in range(4096)]
    ds.VOILUTSequence = [item]
    del ds.WindowCenter, ds.WindowWidth
    return ds


def monochrome1(ds: Dataset) -> Dataset:
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    ds.WindowCenter, ds.WindowWidth = 3000, 5000
    return ds


def sigmoid(ds: Dataset) -> Dataset:
    ds.VOILUTFunction = "SIGMOID"
    return ds


def linear_exact(ds: Dataset) -> Dataset:
    ds.VOILUTFunction = "LINEAR_EXACT"
    return ds


def width_one(ds: Dataset) -> Dataset:
    ds.WindowCenter, ds.WindowWidth = 2000, 1  # a threshold: 0 below the centre, 1 above
    return ds


def inverse_shape(ds: Dataset) -> Dataset:
    ds.PresentationLUTShape = "INVERSE"
    return ds


VARIANTS = [lambda ds: ds, with_voi_lut, monochrome1, sigmoid, linear_exact, width_one]


@pytest.mark.parametrize("variant", [*VARIANTS, inverse_shape])
def test_banded_window_is_the_whole_image_chain(variant) -> None:  # type: ignore[no-untyped-def]
    """The bands are written straight into the display image: still the chain's own result."""
    ds = variant(radiograph(1501, 1201))
    banded = windowed_image(ds)
    whole = preprocessing._grayscale(preprocessing.decode(ds), ds, "header")
    assert banded.dtype == np.float32
    np.testing.assert_array_equal(banded, whole)
    assert len(bands(1501)) == preprocessing.BANDS  # it was banded


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_chain_written_into_a_band_leaves_the_rest_alone(variant) -> None:  # type: ignore[no-untyped-def]
    ds = variant(radiograph(64, 48))
    arr = preprocessing.decode(ds)
    display = np.full((80, 48), -7.0, dtype=np.float32)
    written = preprocessing._grayscale(arr, ds, "header", out=display[8:72])
    assert np.shares_memory(written, display)
    np.testing.assert_array_equal(display[8:72], preprocessing._grayscale(arr, ds, "header"))
    assert (display[:8] == -7).all() and (display[72:] == -7).all()


def test_a_band_that_fails_refuses_the_image() -> None:
    ds = radiograph(1024, 1024)
    ds.RescaleSlope = 1e308  # overflows float32: every band raises
    with pytest.raises(preprocessing.PreprocessRefused, match="overflows"):
        windowed_image(ds)
