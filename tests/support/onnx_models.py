"""Small real ONNX models for runtime tests, built with onnx.helper (no framework needed).

The graph has the shape of the real one: features -> 1x1 conv = class-activation map;
probability = sigmoid(global average of the CAM), so the CAM is exact and the outputs are
"probability" (N, 1) and "cam" (N, 1, H, W).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from triage_node.analysis.manifest import sha256_of


def build_cam_model(
    size: int, channels: int = 1, features: int = 4, seed: int = 0, *, ood: bool = False
) -> onnx.ModelProto:
    """With *ood*, a third output ``ood_score`` (N, 1): the mean input value, so a test can make
    an image "out of distribution" by making it bright."""
    rng = np.random.default_rng(seed)
    conv_w = rng.normal(0, 0.5, (features, channels, 3, 3)).astype(np.float32)
    conv_b = np.zeros(features, dtype=np.float32)
    head_w = rng.normal(0, 0.5, (1, features, 1, 1)).astype(np.float32)
    head_b = np.array([-0.1], dtype=np.float32)
    nodes = [
        helper.make_node("Conv", ["image", "conv_w", "conv_b"], ["f"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["f"], ["r"]),
        helper.make_node("Conv", ["r", "head_w", "head_b"], ["cam"]),
        helper.make_node("GlobalAveragePool", ["cam"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["probability"]),
    ]
    outputs = [
        helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1]),
        helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", 1, size, size]),
    ]
    if ood:
        nodes += [
            helper.make_node("GlobalAveragePool", ["image"], ["brightness"]),
            helper.make_node("Flatten", ["brightness"], ["flat"]),
            helper.make_node("ReduceMean", ["flat"], ["ood_score"], axes=[1], keepdims=1),
        ]
        outputs.append(helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, ["N", 1]))
    graph = helper.make_graph(
        nodes,
        "tiny-cam",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", channels, size, size])],
        outputs,
        [
            numpy_helper.from_array(conv_w, "conv_w"),
            numpy_helper.from_array(conv_b, "conv_b"),
            numpy_helper.from_array(head_w, "head_w"),
            numpy_helper.from_array(head_b, "head_b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def manifest_for(size: int, sha256: str, channels: int = 1, **overrides: Any) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "name": "tiny-test",
        "version": "0.0.1",
        "onnx": {
            "file": "model.onnx",
            "sha256": sha256,
            "input": "image",
            "outputs": {"probability": "probability", "cam": "cam"},
        },
        "input": {"size": size, "channels": channels, "mean": 0.5, "std": 0.25},
        "labels": ["no fracture", "fracture"],
        "operating_points": {
            "high_sensitivity": {"threshold": 0.3, "sensitivity": 0.9},
            "high_specificity": {"threshold": 0.7, "specificity": 0.9},
        },
        "selection": {"modalities": ["CR", "DX", "DR"]},
        "training_data": {"name": "none: random weights for tests"},
        "metrics": {},
    }
    manifest.update(overrides)
    return manifest


def write_model_dir(
    directory: Path,
    size: int = 64,
    channels: int = 1,
    *,
    ood_threshold: float | None = None,
    **overrides: Any,
) -> Path:
    """A model directory; with *ood_threshold*, the graph has an ``ood_score`` output and the
    manifest a scope guard refusing images whose normalised mean is above the threshold."""
    directory.mkdir(parents=True, exist_ok=True)
    ood = ood_threshold is not None
    onnx.save(build_cam_model(size, channels, ood=ood), directory / "model.onnx")
    manifest = manifest_for(size, sha256_of(directory / "model.onnx"), channels, **overrides)
    if ood:
        manifest["onnx"]["outputs"]["ood_score"] = "ood_score"
        manifest["ood"] = {"threshold": ood_threshold}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return directory
