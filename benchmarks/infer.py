"""Inference benchmark: per-image latency of preprocess + ONNX inference + CAM peak.

For a 2000x2500 16-bit synthetic radiograph (the size perf-notes.md measured), on CPU with
2 intra-op threads, batch 1 and batch 8, median of --runs; with CUDA too when onnxruntime-gpu
and a GPU are present. Uses --model DIR, else the bundled models/fracture-v5, else a
ResNet-18-like network with random weights built here (same graph shape as a real model: conv
features -> 1x1 conv CAM -> global average -> sigmoid), so the cost is realistic even before a
model is trained.

Targets (issue "Flags a radiologist can trust"), on 2 CPU threads: under 30 ms per image end to
end, of which read + preprocess under 15 ms; the ONNX file under 50 MB. Published anchor: 1.17 s
per image with Grad-CAM on a GPU (hip EfficientNet-B4 study).

    .venv/bin/python benchmarks/infer.py [--model DIR] [--runs 50] [--threads 2] [--size 384]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from pydicom import dcmread

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.synth import write_study_set  # noqa: E402

from triage_node.analysis.allocator import keep_large_buffers  # noqa: E402
from triage_node.analysis.manifest import sha256_of  # noqa: E402
from triage_node.analysis.preprocess import Preprocessed, preprocess  # noqa: E402
from triage_node.analysis.runtime import ModelSession, cam_peak  # noqa: E402

CACHE = REPO / "benchmarks" / ".cache"
BUNDLED = REPO / "models" / "fracture-v4"
TARGET_TOTAL_MS, TARGET_PREPROCESS_MS, TARGET_ONNX_MB = 30.0, 15.0, 50.0


class _Graph:
    def __init__(self, seed: int = 0) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.weights: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int, relu: bool = True) -> str:
        w, b, y = self.name("w"), self.name("b"), self.name("c")
        scale = np.sqrt(2.0 / (cin * k * k))
        self.weights.append(
            numpy_helper.from_array(
                (self.rng.normal(0, scale, (cout, cin, k, k))).astype(np.float32), w
            )
        )
        self.weights.append(numpy_helper.from_array(np.zeros(cout, np.float32), b))
        pad = k // 2
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, w, b],
                [y],
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[pad, pad, pad, pad],
            )
        )
        if not relu:
            return y
        r = self.name("r")
        self.nodes.append(helper.make_node("Relu", [y], [r]))
        return r

    def block(self, x: str, cin: int, cout: int, stride: int) -> str:
        y = self.conv(x, cin, cout, 3, stride)
        y = self.conv(y, cout, cout, 3, 1, relu=False)
        shortcut = x if (cin == cout and stride == 1) else self.conv(x, cin, cout, 1, stride, False)
        s, r = self.name("s"), self.name("r")
        self.nodes.append(helper.make_node("Add", [y, shortcut], [s]))
        self.nodes.append(helper.make_node("Relu", [s], [r]))
        return r


def resnet18_like(size: int) -> onnx.ModelProto:
    """ResNet-18 layout (BN folded into the convolutions), CAM head, random weights."""
    g = _Graph()
    x = g.conv("image", 1, 64, 7, 2)
    pooled = g.name("p")
    g.nodes.append(
        helper.make_node(
            "MaxPool", [x], [pooled], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]
        )
    )
    x, cin = pooled, 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        x = g.block(x, cin, cout, stride)
        x = g.block(x, cout, cout, 1)
        cin = cout
    cam = g.conv(x, 512, 1, 1, 1, relu=False)
    g.nodes.append(helper.make_node("Identity", [cam], ["cam"]))
    g.nodes.append(helper.make_node("GlobalAveragePool", ["cam"], ["gap"]))
    g.nodes.append(helper.make_node("Flatten", ["gap"], ["logit"]))
    g.nodes.append(helper.make_node("Sigmoid", ["logit"], ["probability"]))
    cam_size = size // 32
    graph = helper.make_graph(
        g.nodes,
        "resnet18-like-cam",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, size, size])],
        [
            helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", 1, cam_size, cam_size]),
        ],
        g.weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def synthetic_model_dir(size: int) -> Path:
    directory = CACHE / f"resnet18-like-{size}"
    if not (directory / "manifest.json").exists():
        directory.mkdir(parents=True, exist_ok=True)
        onnx.save(resnet18_like(size), directory / "model.onnx")
        manifest = {
            "name": "resnet18-like-random",
            "version": "0",
            "onnx": {"file": "model.onnx", "sha256": sha256_of(directory / "model.onnx")},
            "input": {"size": size, "channels": 1},
            "labels": ["no fracture", "fracture"],
            "operating_points": {
                "high_sensitivity": {"threshold": 0.3},
                "high_specificity": {"threshold": 0.7},
            },
            "training_data": {"name": "none: random weights, for timing only"},
        }
        (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return directory


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def measure(model_dir: Path, runs: int, threads: int, preference: tuple[str, ...]) -> None:
    keep_large_buffers()  # as each worker process does when it starts
    model = ModelSession(model_dir, intra_op_threads=threads, preference=preference)
    spec = model.manifest.input
    [path] = write_study_set(CACHE / "infer-radiograph", 1, 2500, 2000)
    pre, tensors = [], []
    for _ in range(runs):
        started = time.perf_counter()
        ready = preprocess(dcmread(path), spec)
        pre.append(time.perf_counter() - started)
        # Keep only what inference needs: holding 50 full-size display images (20 MB each)
        # would make every later allocation fault in fresh pages and skew the timing.
        tensors.append(Preprocessed(ready.tensor, np.zeros((1, 1), np.float32), ready.geometry))
        del ready
    batch1, cam_times = [], []
    for ready in tensors[:5]:  # warm-up: a worker runs thousands; its first few are not typical
        model.run(ready.tensor[None])
    for ready in tensors:
        started = time.perf_counter()
        _, cams, _ = model.run(ready.tensor[None])
        batch1.append(time.perf_counter() - started)
        started = time.perf_counter()
        cam_peak(cams[0], ready.geometry, spec.size)
        cam_times.append(time.perf_counter() - started)
    batch8 = []
    stacked = np.stack([t.tensor for t in tensors[:8]])
    for _ in range(max(3, runs // 8)):
        started = time.perf_counter()
        model.run(stacked)
        batch8.append((time.perf_counter() - started) / 8)
    total = median_ms(pre) + median_ms(batch1) + median_ms(cam_times)
    print(
        f"model {model.manifest.name} ({spec.size} px), provider {model.provider}, "
        f"{threads} intra-op threads, median of {runs}"
    )
    print(
        f"  read + preprocess 2000x2500 16-bit   {median_ms(pre):7.1f} ms   target < "
        f"{TARGET_PREPROCESS_MS:.0f} ms: {median_ms(pre) / TARGET_PREPROCESS_MS:.2f}x of it"
    )
    print(f"  inference, batch 1                   {median_ms(batch1):7.1f} ms")
    print(f"  inference, batch 8 (per image)       {median_ms(batch8):7.1f} ms")
    print(f"  CAM peak                             {median_ms(cam_times):7.2f} ms")
    print(
        f"  end to end per image (batch 1)       {total:7.1f} ms   "
        f"target < {TARGET_TOTAL_MS:.0f} ms on CPU: {total / TARGET_TOTAL_MS:.2f}x of it; "
        "anchor 1170 ms (Grad-CAM, GPU): "
        f"{1170 / total:.0f}x faster"
    )
    megabytes = model.manifest.onnx_path.stat().st_size / 2**20
    print(
        f"  ONNX file                            {megabytes:7.1f} MB   "
        f"target < {TARGET_ONNX_MB:.0f} MB"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", type=Path, help="model directory (default: bundled, else synthetic)"
    )
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=384, help="input size of the synthetic model")
    args = parser.parse_args()
    model_dir = args.model or (BUNDLED if (BUNDLED / "manifest.json").exists() else None)
    model_dir = model_dir or synthetic_model_dir(args.size)
    measure(model_dir, args.runs, args.threads, ("CPUExecutionProvider",))
    if "CUDAExecutionProvider" in ort.get_available_providers():
        measure(model_dir, args.runs, args.threads, ("CUDAExecutionProvider",))
    else:
        print("CUDA: not available here (install onnxruntime-gpu on a GPU machine to measure it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
