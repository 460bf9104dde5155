"""Running the model: ONNX Runtime with the best execution provider there is.

Execution providers sit behind a tiny contract: a name in ``PROVIDER_PREFERENCE``, available when
ONNX Runtime lists it. CUDA is used when onnxruntime-gpu and a GPU are present, else the CPU.
torch is never imported here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from triage_node.analysis.manifest import Manifest, load_manifest
from triage_node.analysis.preprocess import Geometry
from triage_node.errors import ModelError
from triage_node.logs import get_logger, log_event

LOG = get_logger(__name__)
PROVIDER_PREFERENCE = ("CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(
    available: Sequence[str], preference: Sequence[str] = PROVIDER_PREFERENCE
) -> list[str]:
    """The preferred providers that this ONNX Runtime has, best first (CPU always last)."""
    chosen = [p for p in preference if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


@dataclass(frozen=True, slots=True)
class Outputs:
    probabilities: np.ndarray  # (N,) calibrated where the graph folds a calibration in
    cams: np.ndarray  # (N, h, w) logit maps
    milliseconds: float
    ood_scores: np.ndarray | None  # (N,), when the graph has a scope guard


@dataclass(frozen=True, slots=True)
class CamPeak:
    """The hottest point of a class-activation map, in source-image pixels."""

    row: int
    column: int
    value: float  # CAM value at the peak, min-max scaled to [0, 1] over the image area
    area_fraction: float  # share of the image whose scaled CAM is at least half the peak


class ModelSession:
    """A loaded, checked model ready to run batches of preprocessed images."""

    def __init__(
        self,
        directory: Path,
        *,
        intra_op_threads: int = 0,
        preference: Sequence[str] = PROVIDER_PREFERENCE,
    ) -> None:
        self.manifest: Manifest = load_manifest(directory)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        providers = choose_providers(ort.get_available_providers(), preference)
        try:
            self.session = ort.InferenceSession(
                str(self.manifest.onnx_path), sess_options=options, providers=providers
            )
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            if providers == ["CPUExecutionProvider"]:
                raise ModelError(f"{self.manifest.onnx_path}: cannot load: {exc}") from exc
            log_event(
                LOG,
                logging.WARNING,
                "provider_fallback",
                "preferred provider failed; using CPU",
                providers=",".join(providers),
                error=str(exc)[:200],
            )
            self.session = ort.InferenceSession(
                str(self.manifest.onnx_path),
                sess_options=options,
                providers=["CPUExecutionProvider"],
            )
        self.provider = self.session.get_providers()[0]
        self._check_signature()
        log_event(
            LOG,
            logging.INFO,
            "model_loaded",
            "model loaded",
            model=self.manifest.name,
            version=self.manifest.version,
            provider=self.provider,
        )

    def _check_signature(self) -> None:
        m = self.manifest
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if m.input_name not in inputs:
            raise ModelError(f"{m.onnx_path}: no input named {m.input_name!r} (has {list(inputs)})")
        for wanted in (
            m.probability_output,
            m.cam_output,
            *([m.ood_output] if m.ood_output else []),
        ):
            if wanted not in outputs:
                raise ModelError(
                    f"{m.onnx_path}: no output named {wanted!r} (has {sorted(outputs)})"
                )
        shape = inputs[m.input_name].shape
        expected = [m.input.channels, m.input.size, m.input.size]
        if len(shape) != 4 or [d if isinstance(d, int) else None for d in shape[1:]] != expected:
            raise ModelError(
                f"{m.onnx_path}: input shape {shape} does not match the manifest's "
                f"[N, {m.input.channels}, {m.input.size}, {m.input.size}]"
            )

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Probabilities (N,), CAMs (N, h, w) and the milliseconds the run took."""
        outputs = self.outputs(batch)
        return outputs.probabilities, outputs.cams, outputs.milliseconds

    def outputs(self, batch: np.ndarray) -> Outputs:
        """Everything the graph says about a (N, C, H, W) batch, in one run."""
        if batch.ndim != 4:
            raise ValueError(f"batch must be (N, C, H, W), got {batch.shape}")
        m = self.manifest
        names = [m.probability_output, m.cam_output, *([m.ood_output] if m.ood_output else [])]
        started = time.perf_counter()
        results = self.session.run(
            names, {m.input_name: np.ascontiguousarray(batch, dtype=np.float32)}
        )
        elapsed = (time.perf_counter() - started) * 1000
        probability, cam = results[0], results[1]
        n = len(batch)
        return Outputs(
            probabilities=np.asarray(probability, dtype=np.float32).reshape(n),
            cams=np.asarray(cam, dtype=np.float32).reshape(n, *np.shape(cam)[-2:]),
            milliseconds=elapsed,
            ood_scores=(
                np.asarray(results[2], dtype=np.float64).reshape(n) if len(results) > 2 else None
            ),
        )

    def out_of_scope(self, ood_score: float | None) -> str | None:
        """Why the image guard refuses an image with this score, or None when it passes."""
        threshold = self.manifest.ood_threshold
        if ood_score is None or threshold is None:
            return None
        if np.isfinite(ood_score) and ood_score <= threshold:
            return None
        return (
            f"out of scope: the image does not look like the radiographs the model was trained "
            f"on (scope guard score {ood_score:.2f} > {threshold:.2f})"
        )


def cam_peak(cam: np.ndarray, geometry: Geometry, input_size: int) -> CamPeak:
    """Locate the CAM's peak inside the image area and map it to source pixels."""
    h, w = cam.shape
    sy, sx = h / input_size, w / input_size
    top_f, left_f, bottom_f, right_f = geometry.window_in(h, w, input_size)
    top, left = int(top_f), int(left_f)
    bottom, right = max(top + 1, round(bottom_f)), max(left + 1, round(right_f))
    area = cam[top:bottom, left:right]
    low, high = float(area.min()), float(area.max())
    scaled = (area - low) / (high - low) if high > low else np.zeros_like(area)
    r, c = np.unravel_index(int(np.argmax(scaled)), scaled.shape)
    # Centre of the CAM cell, back through the resize, into source-image coordinates.
    row = ((r + top + 0.5) / sy - geometry.pad_top) / geometry.scale_y
    column = ((c + left + 0.5) / sx - geometry.pad_left) / geometry.scale_x
    return CamPeak(
        row=int(np.clip(row, 0, geometry.rows - 1)),
        column=int(np.clip(column, 0, geometry.columns - 1)),
        value=float(scaled[r, c]),
        area_fraction=float((scaled >= 0.5 * scaled[r, c]).mean()) if high > low else 1.0,
    )
