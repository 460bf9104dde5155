"""The grayscale pipeline against pydicom's reference functions and across transfer syntaxes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.tag import Tag

from tests.support.peers import DICOM_DIR
from tests.support.synth import radiograph
from triage_node.analysis.preprocess import (
    InputSpec,
    apply_modality,
    apply_presentation,
    apply_voi,
    decode,
    preprocess,
    resize,
    window,
)
from triage_node.errors import PreprocessRefused

pytestmark = pytest.mark.skipif(not DICOM_DIR.is_dir(), reason=f"{DICOM_DIR} not found")

LOSSLESS = ["uncompressed", "JPEG-lossless", "J2K-lossless", "JLS-lossless", "RLE"]
# JPEG Extended 12-bit (lossy, and with invalid SOS parameters that only GDCM tolerates):
# mean absolute difference of the normalised input (std 0.25) to the uncompressed original.
LOSSY_MEAN_ABS_TOLERANCE = 0.02


def read(name: str) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(DICOM_DIR / name)


def windowed_files() -> list[str]:
    names = []
    for path in sorted(DICOM_DIR.glob("*.dcm")):
        try:
            ds = read(path.name)
        except Exception:
            continue
        if "PixelData" in ds and "WindowCenter" in ds and "VOILUTSequence" not in ds:
            try:
                decode(ds)
            except PreprocessRefused:
                continue
            names.append(path.name)
    return names


@pytest.mark.parametrize("name", windowed_files())
def test_window_matches_pydicom(name: str) -> None:
    ds = read(name)
    arr = decode(ds)
    ours = apply_voi(apply_modality(arr, ds), ds)
    reference = apply_voi_lut(apply_modality_lut(arr, ds), ds).astype(np.float64)
    bits = int(ds.BitsStored)
    low, high = (
        (0, 2**bits - 1)
        if ds.PixelRepresentation == 0
        else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    )
    if "RescaleSlope" in ds:
        low = low * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        high = high * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = (reference - low) / (high - low)
    assert np.abs(ours - expected).max() < 1e-4, name


def test_modality_lut_sequence_matches_pydicom() -> None:
    ds = read("OT_ModalityLUTSequence_signed_IHE-MESA.dcm")
    arr = decode(ds)
    np.testing.assert_allclose(apply_modality(arr, ds), apply_modality_lut(arr, ds), atol=1e-4)


def test_voi_lut_sequence_matches_pydicom() -> None:
    ds = read("OT_VOILUTSequence_IHE-MESA.dcm")
    arr = apply_modality(decode(ds), ds)
    reference = apply_voi_lut(arr, ds, prefer_lut=True).astype(np.float64)
    ours = apply_voi(arr, ds)
    np.testing.assert_allclose(ours, reference / max(ds.VOILUTSequence[0].LUTData), atol=1e-6)


@pytest.mark.parametrize("image", ["CR_RG2_hip_mono2_10bit", "CR_RG3_extremityAP_mono1_10bit"])
def test_same_input_from_every_transfer_syntax(image: str) -> None:
    spec = InputSpec(size=384)
    reference = preprocess(read(f"{image}_uncompressed.dcm"), spec).tensor
    for syntax in LOSSLESS[1:]:
        path = DICOM_DIR / f"{image}_{syntax}.dcm"
        if path.exists():
            np.testing.assert_array_equal(preprocess(read(path.name), spec).tensor, reference)
    lossy = DICOM_DIR / f"{image}_JPEG-extended-lossy.dcm"
    if lossy.exists():
        tensor = preprocess(read(lossy.name), spec).tensor
        assert np.abs(tensor - reference).mean() < LOSSY_MEAN_ABS_TOLERANCE


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("CR_header_only_NoPixelData.dcm", "no Pixel Data"),
        ("edge_oob_65535x65535_tiny.dcm", "Rows x Columns 65535 x 65535"),
        ("edge_truncated_PixelData.dcm", "Pixel Data holds 8130 bytes"),
        ("edge_bad_VR.dcm", "invalid image header"),
        ("edge_J2K_embedded_sequence_delimiter.dcm", "cannot decode Pixel Data"),
    ],
)
def test_refusals_have_reasons(name: str, reason: str) -> None:
    with pytest.raises(PreprocessRefused, match=reason):
        preprocess(read(name), InputSpec(size=64))


def test_monochrome1_is_inverted_so_bone_is_bright() -> None:
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME1"
    arr = np.array([[0.0, 0.25, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(apply_presentation(arr, ds), [[1.0, 0.75, 0.0]])
    ds.PresentationLUTShape = "INVERSE"  # inverse of MONOCHROME1 shows as stored
    np.testing.assert_array_equal(apply_presentation(arr, ds), arr)


def test_linear_window_follows_ps3_3() -> None:
    x = np.array([0, 99.5, 100, 150, 200, 201], dtype=np.float32)
    # c=150, w=101: below c-0.5-(w-1)/2 = 99.5 -> 0; above c-0.5+(w-1)/2 = 199.5 -> 1
    np.testing.assert_allclose(window(x, 150, 101), [0, 0, 0.005, 0.505, 1, 1], atol=1e-6)


def test_letterbox_keeps_aspect_and_records_geometry() -> None:
    arr = np.ones((200, 100), dtype=np.float32)
    out, geometry = resize(arr, 64)
    assert out.shape == (64, 64)
    assert (geometry.pad_top, geometry.pad_left) == (0, 16)
    assert out[:, :16].max() == 0 and out[:, 16:48].min() == pytest.approx(1)


def raw_ds(ds: Dataset, keyword: str, text: str) -> None:
    """A DS element holding *text* as a file would (pydicom will not set 'NaN' itself)."""
    value = text.encode() + b" " * (len(text) % 2)
    ds[Tag(keyword)] = RawDataElement(Tag(keyword), "DS", len(value), value, 0, False, True)


@pytest.mark.parametrize("center", ["NaN", "inf", "-inf"])
def test_a_window_that_is_not_a_number_is_ignored(center: str) -> None:
    ds = Dataset()
    raw_ds(ds, "WindowCenter", center)
    raw_ds(ds, "WindowWidth", "400")
    arr = np.linspace(0, 1000, 100, dtype=np.float32).reshape(10, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid DS
        out = apply_voi(arr, ds)
    assert np.isfinite(out).all() and out.max() == 1.0 and out.min() == 0.0  # percentile window


@pytest.mark.parametrize(("slope", "intercept"), [("NaN", "0"), ("1", "inf"), ("1e308", "0")])
def test_a_rescale_that_is_not_a_usable_number_is_refused(slope: str, intercept: str) -> None:
    ds = radiograph(32, 32)
    raw_ds(ds, "RescaleSlope", slope)
    raw_ds(ds, "RescaleIntercept", intercept)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refused = r"Rescale Slope .* (is not a number|overflows)"
        with pytest.raises(PreprocessRefused, match=refused):
            preprocess(ds, InputSpec(size=32))


def test_the_allocator_keeps_large_buffers_on_glibc() -> None:
    import platform

    from triage_node.analysis.allocator import keep_large_buffers

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert keep_large_buffers() is True
