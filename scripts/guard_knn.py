"""Measure a nearest-neighbour scope guard (Sun et al. 2022) against the bundled Mahalanobis one.

Reads the pooled features that ``scripts/guard_by_layer.py --save FILE.npz`` wrote (training,
validation and test splits of FracAtlas, and the shared DICOM samples through the node's own
preprocessing) and scores each image by its cosine distance (on unit-length features) to its
k-th nearest training image, for several k. As for the bundled guard, the threshold is the
highest validation score (or, with ``--pass-rate``, the score under which that share of them
fall); printed are the test split's pass count and each DICOM file's score divided by the
threshold (above 1: stopped). Plain numpy; nothing here is used at run time; the figures are
in the model card.

    .venv/bin/python scripts/guard_knn.py --features features-v4.npz --layer top [--pass-rate 0.99]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from triage_node.training.ood import threshold_for_pass_rate

NEIGHBOURS = (1, 5, 20, 50)


def unit(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    return np.asarray(f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12))


def sorted_distances(features: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Distances of each unit-length row of *features* to every row of *reference* (both
    already unit length, sqrt(2 - 2 cos)), nearest first: column k-1 is the k-th nearest."""
    return np.sqrt(np.sort(np.maximum(2 - 2 * features @ reference.T, 0), axis=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, required=True, help="guard_by_layer.py --save")
    parser.add_argument("--layer", default="top", help="top, or block_N as saved")
    parser.add_argument("--pass-rate", type=float, default=1.0, help="of validation images")
    args = parser.parse_args()

    saved = np.load(args.features)
    train, validation, test, dicom = (
        unit(saved[f"{part}_{args.layer}"]) for part in ("train", "validation", "test", "dicom")
    )
    validation, test, dicom = (sorted_distances(part, train) for part in (validation, test, dicom))
    ratios = {}
    for k in NEIGHBOURS:
        threshold = threshold_for_pass_rate(validation[:, k - 1], args.pass_rate)
        passed = int((test[:, k - 1] <= threshold).sum())
        print(f"k = {k:2d}: threshold {threshold:.4f}, test {passed}/{len(test)} pass")
        ratios[k] = dicom[:, k - 1] / threshold
    print(
        "score / threshold (above 1: stopped)".ljust(50)
        + "".join(f"{f'k={k}':>8s}" for k in ratios)
    )
    for row, label in enumerate(saved["dicom_labels"]):
        print(str(label).ljust(50) + "".join(f"{ratios[k][row]:8.2f}" for k in ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
