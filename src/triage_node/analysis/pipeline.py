"""Analyse a study: select the images the model is for, preprocess them, run one batch.

Used by the workers (``worker``) and by ``triage-node infer`` on plain files, so both give the
same answer for the same image.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from triage_node.analysis.manifest import Manifest
from triage_node.analysis.preprocess import Geometry, preprocess
from triage_node.analysis.render import heatmap, shrink
from triage_node.analysis.runtime import ModelSession, cam_peak
from triage_node.analysis.scope import UnlabelledPolicy
from triage_node.domain import MANUFACTURER, ImageResult, OperatingPointName, Skip, StudyAnalysis
from triage_node.errors import PreprocessRefused


@dataclass(frozen=True, slots=True)
class ImageSource:
    """One image to consider: its database id (0 for plain files), UID and path."""

    instance_id: int
    sop_instance_uid: str
    path: Path


def selection_refusal(
    ds: Dataset, manifest: Manifest, unlabelled: UnlabelledPolicy = "analyse"
) -> str | None:
    """Why the model is not for this instance, or None when it is: the node's own objects,
    modality and SOP class, then the model's body-part scope (:mod:`triage_node.analysis.scope`)."""
    rules = manifest.selection
    if str(ds.get("Manufacturer", "")).strip() == MANUFACTURER:
        return "the node's own output"
    modality = str(ds.get("Modality", "")).upper()
    if rules.modalities and modality not in rules.modalities:
        return f"modality {modality or 'missing'} is not one the model is for"
    sop_class = str(ds.get("SOPClassUID", ""))
    if rules.sop_classes and sop_class not in rules.sop_classes:
        return f"SOP class {sop_class} is not one the model is for"
    body_part = str(ds.get("BodyPartExamined", "")).upper()
    if rules.body_parts and body_part not in rules.body_parts:
        return f"body part {body_part or 'missing'} is not one the model is for"
    view = str(ds.get("ViewPosition", "")).upper()
    if rules.views and view not in rules.views:
        return f"view {view or 'missing'} is not one the model is for"
    decision = manifest.scope.decide(ds, unlabelled)
    return None if decision.analyse else decision.reason


def read_dataset(path: Path, *, pixels: bool = True) -> Dataset:
    """A stored file, without pydicom's warnings: they quote element values (patient data)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(path, stop_before_pixels=not pixels)


def analyse(
    sources: Iterable[ImageSource],
    model: ModelSession,
    max_batch: int = 8,
    pictures: dict[str, np.ndarray] | None = None,
    unlabelled: UnlabelledPolicy = "analyse",
) -> StudyAnalysis:
    """Per-image probabilities and CAM peaks for every eligible image; the rest skipped.

    Eligible: selected by the header (:func:`selection_refusal`), preprocessed, and passed by
    the model's image guard (its ``ood_score``) where it has one. With *pictures*, the heatmap of
    each analysed image (RGB, see :mod:`triage_node.analysis.render`) is put there under its
    SOP Instance UID.
    """
    manifest = model.manifest
    prepared: list[tuple[ImageSource, np.ndarray, Geometry, float]] = []
    displays: dict[str, np.ndarray] = {}
    skipped: list[Skip] = []
    for source in sources:
        started = time.perf_counter()
        try:
            ds = read_dataset(source.path)
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            skipped.append(Skip(source.instance_id, source.sop_instance_uid, f"unreadable: {exc}"))
            continue
        reason = selection_refusal(ds, manifest, unlabelled)
        if reason is not None:
            skipped.append(Skip(source.instance_id, source.sop_instance_uid, reason))
            continue
        try:
            ready = preprocess(ds, manifest.input)
        except PreprocessRefused as exc:
            skipped.append(Skip(source.instance_id, source.sop_instance_uid, str(exc)))
            continue
        if pictures is not None:
            displays[source.sop_instance_uid] = shrink(ready.display)
        ms = (time.perf_counter() - started) * 1000
        prepared.append((source, ready.tensor, ready.geometry, ms))

    images: list[ImageResult] = []
    inference_ms = 0.0
    for start in range(0, len(prepared), max_batch):
        chunk = prepared[start : start + max_batch]
        outputs = model.outputs(np.stack([tensor for _, tensor, _, _ in chunk]))
        inference_ms += outputs.milliseconds
        guard = outputs.ood_scores if outputs.ood_scores is not None else [None] * len(chunk)
        for (source, _, geometry, pre_ms), prob, cam, score in zip(
            chunk, outputs.probabilities, outputs.cams, guard, strict=True
        ):
            display = displays.pop(source.sop_instance_uid, None)
            refusal = model.out_of_scope(None if score is None else float(score))
            if refusal is not None:
                skipped.append(Skip(source.instance_id, source.sop_instance_uid, refusal))
                continue
            peak = cam_peak(cam, geometry, manifest.input.size)
            if pictures is not None and display is not None:
                pictures[source.sop_instance_uid] = heatmap(
                    display, cam, geometry, manifest.input.size
                )
            images.append(
                ImageResult(
                    instance_id=source.instance_id,
                    sop_instance_uid=source.sop_instance_uid,
                    probability=float(prob),
                    peak_row=peak.row,
                    peak_column=peak.column,
                    peak_value=peak.value,
                    peak_area=peak.area_fraction,
                    preprocess_ms=pre_ms,
                )
            )
    return StudyAnalysis(
        images=tuple(images),
        skipped=tuple(skipped),
        model_name=manifest.name,
        model_version=manifest.version,
        provider=model.provider,
        threshold_high_sensitivity=manifest.operating_points[
            OperatingPointName.HIGH_SENSITIVITY
        ].threshold,
        threshold_high_specificity=manifest.operating_points[
            OperatingPointName.HIGH_SPECIFICITY
        ].threshold,
        inference_ms=inference_ms,
    )
