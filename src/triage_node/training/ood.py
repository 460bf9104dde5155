"""An image-based scope guard: how far an image's features are from the training radiographs.

The Mahalanobis distance (Lee et al. 2018) of the model's pooled last-layer features from their
mean over the training images, with a shrunk covariance (the features outnumber nothing but
the images: 1280 of them from ~2,400 images). Fitted here in numpy as a mean and a whitening
matrix; the exporter folds both into the ONNX graph, which then outputs ``ood_score`` (the
squared distance divided by the number of feature dimensions, about 1 for a typical training
image). The threshold is chosen on validation images; see :func:`threshold_for_pass_rate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHRINKAGE = 0.1  # share of the covariance replaced by its mean variance (Ledoit-Wolf style)


@dataclass(frozen=True, slots=True)
class Whitening:
    mean: np.ndarray  # (D,)
    matrix: np.ndarray  # (D, D): ||(f - mean) @ matrix||^2 / D is the score

    def score(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, dtype=np.float64) - self.mean) @ self.matrix
        return np.asarray((z * z).sum(axis=1) / self.mean.shape[0])


def fit_whitening(features: np.ndarray, shrinkage: float = SHRINKAGE) -> Whitening:
    """Mean and inverse square root of the shrunk covariance of (N, D) *features*."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError("need (N, D) features from at least two images")
    mean = f.mean(axis=0)
    covariance = np.cov(f - mean, rowvar=False)
    level = float(np.trace(covariance)) / covariance.shape[0]
    shrunk = (1 - shrinkage) * covariance + shrinkage * level * np.eye(covariance.shape[0])
    values, vectors = np.linalg.eigh(shrunk)
    values = np.maximum(values, 1e-12 * max(level, 1e-12))
    return Whitening(mean, vectors / np.sqrt(values))


def threshold_for_pass_rate(scores: np.ndarray, pass_rate: float) -> float:
    """The score at or under which *pass_rate* of these (in-scope) images fall."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if not len(s) or not 0 < pass_rate <= 1:
        raise ValueError("need scores and a pass rate in (0, 1]")
    return float(s[min(len(s) - 1, int(np.ceil(pass_rate * len(s))) - 1)])
