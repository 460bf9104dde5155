"""Synthetic radiographs for tests and benchmarks (no patient data; names are made up)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"

SYNTHETIC_PATIENT_NAME = "SYNTHETIC^PATIENT"
SYNTHETIC_PATIENT_ID = "SYN-0001-PID"
SYNTHETIC_ACCESSION = "SYNACC0001"


def radiograph(
    rows: int,
    columns: int,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_class_uid: str = DX_FOR_PRESENTATION,
    seed: int = 0,
) -> Dataset:
    """A 16-bit (12 bits stored) MONOCHROME2 radiograph with smooth structure plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:columns]
    base = 1500 + 800 * np.sin(x / max(columns, 1) * 6.0) * np.cos(y / max(rows, 1) * 4.0)
    pixels = np.clip(base + rng.normal(0, 60, (rows, columns)), 0, 4095).astype(np.uint16)

    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = "DX" if sop_class_uid == DX_FOR_PRESENTATION else "CR"
    ds.PatientName = SYNTHETIC_PATIENT_NAME
    ds.PatientID = SYNTHETIC_PATIENT_ID
    ds.AccessionNumber = SYNTHETIC_ACCESSION
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.BodyPartExamined = "HAND"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.PixelData = pixels.tobytes()
    return ds


def write_study_set(
    directory: Path, count: int, rows: int, columns: int, *, per_study: int = 4
) -> list[Path]:
    """*count* instances in studies of *per_study* images each; returns their paths in order."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    study_uid = series_uid = ""
    for index in range(count):
        if index % per_study == 0:
            study_uid, series_uid = generate_uid(), generate_uid()
        ds = radiograph(rows, columns, study_uid=study_uid, series_uid=series_uid, seed=index)
        ds.InstanceNumber = index % per_study + 1
        path = directory / f"img{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def dx_from_picture(
    picture: Path, study_uid: str, series_uid: str, number: int, *, body_part: str = "HAND"
) -> Dataset:
    """A labelled picture (e.g. a FracAtlas JPEG) wrapped as an 8-bit DX instance."""
    from PIL import Image

    with Image.open(picture) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.uint8)
    ds = radiograph(1, 1, study_uid=study_uid, series_uid=series_uid)
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.WindowCenter, ds.WindowWidth = 128, 256
    ds.BodyPartExamined = body_part
    ds.InstanceNumber = number
    ds.PixelData = pixels.tobytes()
    return ds
