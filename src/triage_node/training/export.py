"""From a trained network to a model directory the runtime loads (training only; uses torch).

``model.onnx`` has one input ``image`` (N, C, S, S) with a dynamic batch and two outputs,
``probability`` (N, 1) and ``cam`` (N, 1, h, w). Every export ends with a parity check: the same
inputs through torch and through ONNX Runtime must agree to within :data:`PARITY_TOLERANCE`, or
the export fails. ``manifest.json`` is written last and read back with the runtime's own loader.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from triage_node.analysis.manifest import MANIFEST, Manifest, load_manifest, sha256_of
from triage_node.analysis.preprocess import InputSpec
from triage_node.errors import ModelError
from triage_node.training.network import ExportWrapper

PARITY_TOLERANCE = 1e-4
OPSET = 17
ONNX_FILE = "model.onnx"
OUTPUTS = ("probability", "cam", "ood_score")


def export_onnx(wrapper: ExportWrapper, spec: InputSpec, path: Path) -> None:
    wrapper = wrapper.eval()
    example = torch.zeros(1, spec.channels, spec.size, spec.size)
    batch = {0: "N"}
    names = list(OUTPUTS[: 3 if wrapper.with_ood else 2])
    with warnings.catch_warnings():
        # torch 2.13 calls the TorchScript exporter deprecated; it needs no onnxscript and makes a
        # plain opset-17 graph that ONNX Runtime runs everywhere.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            input_names=["image"],
            output_names=names,
            dynamic_axes={"image": batch, **dict.fromkeys(names, batch)},
            opset_version=OPSET,
            dynamo=False,
        )


def parity(wrapper: ExportWrapper, onnx_path: Path, inputs: np.ndarray) -> float:
    """Largest difference between torch and ONNX Runtime over every output, relative to that
    output's largest magnitude for the same image where it is larger than 1.

    The probability (0-1) is compared absolutely. An OOD score of an odd image can be in the
    hundreds, and a CAM is a map of cell logits that reaches 50-80 in a network trained long:
    every cell is a sum of terms of that size, so a cell near zero carries their float32
    rounding (about 1e-4 where the map peaks at 55), which says nothing about the graph.
    Measured against the map's own scale, a graph that differs still stands out by orders of
    magnitude (tested)."""
    wrapper = wrapper.eval()
    with torch.no_grad():
        expected = [t.numpy() for t in wrapper(torch.from_numpy(inputs))]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    actual = session.run(list(OUTPUTS[: len(expected)]), {"image": inputs})
    worst = 0.0
    for want, got in zip(expected, actual, strict=True):
        if np.shape(want) != np.shape(got):
            raise ModelError(f"{onnx_path}: output shape {np.shape(got)} != torch {want.shape}")
        worst = max(worst, relative_gap(want, np.asarray(got)))
    return worst


def relative_gap(want: np.ndarray, got: np.ndarray) -> float:
    """Largest |want - got| of one output (batch first), divided by that image's largest
    |want| where it is larger than 1 (see :func:`parity`)."""
    per_image = np.abs(want).reshape(len(want), -1).max(axis=1)
    scale = np.maximum(1.0, per_image).reshape((-1,) + (1,) * (want.ndim - 1))
    return float(np.max(np.abs(want - got) / scale))


def export_checked(
    wrapper: ExportWrapper, spec: InputSpec, directory: Path, inputs: np.ndarray
) -> float:
    """Export to ``directory/model.onnx`` and check parity on *inputs* (N, C, S, S)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ONNX_FILE
    export_onnx(wrapper, spec, path)
    worst = parity(wrapper, path, np.ascontiguousarray(inputs, dtype=np.float32))
    if not worst < PARITY_TOLERANCE:
        raise ModelError(
            f"{path}: torch and ONNX Runtime differ by {worst:.3g} (tolerance {PARITY_TOLERANCE})"
        )
    return worst


def write_manifest(directory: Path, document: dict[str, Any]) -> Manifest:
    """Fill in the ONNX file's SHA-256, write ``manifest.json`` atomically, read it back."""
    document = dict(document)
    document["onnx"] = {
        "file": ONNX_FILE,
        "sha256": sha256_of(directory / ONNX_FILE),
        "input": "image",
        "outputs": {name: name for name in OUTPUTS if name != "ood_score" or "ood" in document},
        "opset": OPSET,
    }
    target = directory / MANIFEST
    temporary = target.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    temporary.replace(target)
    return load_manifest(directory)


def input_section(spec: InputSpec) -> dict[str, Any]:
    return asdict(spec)
