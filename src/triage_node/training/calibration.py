"""Probabilities that mean what they say: Platt scaling and the expected calibration error.

Training weights the rare positive class up, which shifts and stretches the network's logits; a
score of 0.6 then does not mean "six in ten are fractured". Platt scaling (Platt 1999) fits
``p = sigmoid(a * z + b)`` to the validation logits ``z`` by maximum likelihood; temperature
scaling is the special case ``b = 0``. The two numbers are folded into the exported graph, so the
``probability`` the node reports is the calibrated one. Plain numpy; no framework.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from triage_node.training.statistics import calibration_bins, calibration_table


@dataclass(frozen=True, slots=True)
class Platt:
    """``p = sigmoid(scale * logit + shift)``; the identity is (1, 0)."""

    scale: float = 1.0
    shift: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and math.isfinite(self.shift)) or self.scale <= 0:
            raise ValueError(f"calibration scale {self.scale} must be a positive number")

    def apply(self, logits: np.ndarray) -> np.ndarray:
        return _sigmoid(self.scale * np.asarray(logits, dtype=np.float64) + self.shift)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) without overflow for large |x|."""
    return np.asarray(np.exp(-np.logaddexp(0.0, -x)))


def fit_platt(logits: np.ndarray, labels: np.ndarray, *, iterations: int = 100) -> Platt:
    """Maximum-likelihood (a, b) by Newton's method, with Platt's smoothed targets
    ((n+ + 1)/(n+ + 2) and 1/(n- + 2)) so a separable set does not send *a* to infinity."""
    z = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if z.shape != y.shape or not y.any() or y.all():
        raise ValueError("calibration needs logits for both classes")
    positives, negatives = int(y.sum()), int((~y).sum())
    target = np.where(y, (positives + 1) / (positives + 2), 1 / (negatives + 2))
    a, b = 1.0, 0.0
    for _ in range(iterations):
        p = _sigmoid(a * z + b)
        gradient = np.array([np.sum((p - target) * z), np.sum(p - target)])
        w = p * (1 - p) + 1e-12
        hessian = np.array([[np.sum(w * z * z), np.sum(w * z)], [np.sum(w * z), np.sum(w)]])
        step = np.linalg.solve(hessian + 1e-9 * np.eye(2), gradient)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-10:
            break
    if not a > 0:
        raise ValueError("the logits do not rank the classes (fitted calibration slope <= 0)")
    return Platt(float(a), float(b))


def expected_calibration_error(
    labels: np.ndarray, probabilities: np.ndarray, bins: int = 10
) -> float:
    """ECE (Naeini et al. 2015; Guo et al. 2017): the case-weighted mean gap between the mean
    predicted probability and the observed fraction positive, over the equal-width bins of
    :func:`triage_node.training.statistics.calibration_table` (the reliability diagram's)."""
    table = calibration_table(labels, probabilities, bins)
    cases = sum(n for _, _, n, _, _ in table)
    return float(
        sum(n * abs(predicted - observed) for _, _, n, predicted, observed in table) / cases
    )


def ece_if_calibrated(
    probabilities: np.ndarray, bins: int = 10, draws: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """The expected calibration error that these images would show if the probabilities were
    exactly right: (mean, 95th percentile) over *draws* sets of labels drawn from the
    probabilities themselves (each image fractured with its own probability; "consistency
    resampling", Bröcker and Smith 2007).

    ECE is a sum of absolute gaps, so sampling alone makes it positive: a few hundred images
    show 0.02-0.04 from perfectly calibrated probabilities. A measured ECE above the 95th
    percentile is miscalibration these images can tell apart from chance; one below it is not.
    """
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    if not len(p):
        raise ValueError("no probabilities")
    index = calibration_bins(p, bins)
    if (index < 0).any():
        raise ValueError("probabilities must lie in [0, 1]")
    members = np.zeros((len(p), bins))
    members[np.arange(len(p)), index] = 1.0  # image -> its bin
    expected = p @ members  # per bin: the sum of the probabilities
    rng = np.random.default_rng(seed)
    errors = np.empty(draws)
    step = max(1, min(250, 2_000_000 // len(p)))  # label sets at a time: ~16 MB of temporaries
    for start in range(0, draws, step):
        labels = rng.random((min(step, draws - start), len(p))) < p
        errors[start : start + len(labels)] = np.abs(labels @ members - expected).sum(axis=1)
    errors /= len(p)
    return float(errors.mean()), float(np.quantile(errors, 0.95))


def logit(probabilities: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.log(p / (1 - p))
