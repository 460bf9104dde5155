"""Reading labelled images for training and evaluation: PNG/JPEG bit depths and DICOM files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.synth import write_study_set
from triage_node.analysis.preprocess import windowed_image
from triage_node.errors import DatasetFolderError
from triage_node.training.folders import load_folder
from triage_node.training.imagefile import read_display


def test_8_and_16_bit_pictures_scale_to_unit_range(tmp_path: Path) -> None:
    eight = np.array([[0, 128, 255]], dtype=np.uint8)
    Image.fromarray(eight, mode="L").save(tmp_path / "a.png")
    sixteen = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "b.png")
    Image.fromarray(np.dstack([eight] * 3), mode="RGB").save(tmp_path / "c.jpg", quality=100)
    np.testing.assert_allclose(read_display(tmp_path / "a.png"), [[0, 128 / 255, 1]], atol=1e-6)
    np.testing.assert_allclose(read_display(tmp_path / "b.png"), [[0, 32768 / 65535, 1]], atol=1e-6)
    rgb = read_display(tmp_path / "c.jpg")
    assert rgb.dtype == np.float32 and rgb.shape == (1, 3) and 0 <= rgb.min() <= rgb.max() <= 1


def test_dicom_files_with_a_labels_csv_use_the_runtime_pipeline(tmp_path: Path) -> None:
    files = write_study_set(tmp_path / "images", 4, 40, 30)
    rows = "\n".join(f"{p.name},{i % 2}" for i, p in enumerate(files))
    (tmp_path / "labels.csv").write_text(f"image_id,fractured\n{rows}\n")
    examples = load_folder(tmp_path)
    assert [e.label for e in examples] == [0, 1, 0, 1]
    import pydicom

    expected = windowed_image(pydicom.dcmread(files[0]))
    np.testing.assert_array_equal(read_display(examples[0].path), expected)


def test_unreadable_images_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DatasetFolderError, match=r"broken\.png: cannot be read as an image"):
        read_display(bad)
    dicom = tmp_path / "broken.dcm"
    dicom.write_bytes(b"nothing like DICOM")
    with pytest.raises(DatasetFolderError, match=r"broken\.dcm"):
        read_display(dicom)
