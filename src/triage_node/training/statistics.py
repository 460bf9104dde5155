"""Evaluation metrics for a binary finding, in plain numpy (no framework needed).

AUROC as the Mann-Whitney statistic (ties count one half) with a DeLong 95% confidence interval
(DeLong, DeLong and Clarke-Pearson 1988, in the fast form of Sun and Xu 2014), and the paired
difference of two AUROCs on the same cases; sensitivity and specificity at a threshold, with
Wilson score 95% intervals (Wilson 1927: a proportion near 0 or 1 of a hundred cases is not as
sure as its normal approximation says); thresholds for a wanted sensitivity or specificity; the
Youden threshold; a calibration table.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

Z_95 = 1.959963984540054


@dataclass(frozen=True, slots=True)
class Auroc:
    value: float
    low: float  # 95% confidence interval (DeLong)
    high: float


@dataclass(frozen=True, slots=True)
class Confusion:
    threshold: float
    sensitivity: float
    specificity: float
    true_positive: int
    false_negative: int
    true_negative: int
    false_positive: int


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    if not y.any() or y.all():
        raise ValueError("AUROC needs at least one positive and one negative case")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return y, s


def _midranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and ordered[end + 1] == ordered[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def _structural(y: np.ndarray, s: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUROC and DeLong's structural components: one per positive case (the share of negatives
    it outscores) and one per negative (the share of positives that outscore it)."""
    pos, neg = s[y], s[~y]
    m, n = len(pos), len(neg)
    all_ranks = _midranks(np.concatenate([pos, neg]))
    pos_ranks, neg_ranks = _midranks(pos), _midranks(neg)
    value = (all_ranks[:m].sum() - m * (m + 1) / 2) / (m * n)
    v10 = (all_ranks[:m] - pos_ranks) / n  # (Sun and Xu 2014)
    v01 = 1 - (all_ranks[m:] - neg_ranks) / m
    return float(value), v10, v01


def auroc(labels: np.ndarray, scores: np.ndarray) -> Auroc:
    """Area under the ROC curve with its DeLong 95% confidence interval (clipped to [0, 1])."""
    y, s = _check(labels, scores)
    value, v10, v01 = _structural(y, s)
    m, n = len(v10), len(v01)
    s10 = v10.var(ddof=1) if m > 1 else 0.0
    s01 = v01.var(ddof=1) if n > 1 else 0.0
    se = math.sqrt(s10 / m + s01 / n)
    return Auroc(value, max(0.0, value - Z_95 * se), min(1.0, value + Z_95 * se))


@dataclass(frozen=True, slots=True)
class AurocDifference:
    difference: float  # AUROC of the first scores minus the second's
    low: float  # 95% confidence interval (DeLong, paired)
    high: float
    p_value: float  # two-sided, for no difference


def paired_auroc_difference(
    labels: np.ndarray, first: np.ndarray, second: np.ndarray
) -> AurocDifference:
    """The difference of two AUROCs measured on the same cases, with DeLong's paired 95%
    interval and two-sided p-value (DeLong et al. 1988): two models scored on the same images
    are correlated, and their difference is surer than either interval says."""
    y, a = _check(labels, first)
    _, b = _check(labels, second)
    value_a, v10_a, v01_a = _structural(y, a)
    value_b, v10_b, v01_b = _structural(y, b)
    m, n = len(v10_a), len(v01_a)
    if m < 2 or n < 2:
        raise ValueError("a paired AUROC comparison needs at least two cases of each class")
    variance = (v10_a - v10_b).var(ddof=1) / m + (v01_a - v01_b).var(ddof=1) / n
    difference = value_a - value_b
    se = math.sqrt(float(variance))
    p_value = 1.0 if se == 0 else math.erfc(abs(difference) / se / math.sqrt(2))
    return AurocDifference(
        float(difference), difference - Z_95 * se, difference + Z_95 * se, p_value
    )


def confusion(labels: np.ndarray, scores: np.ndarray, threshold: float) -> Confusion:
    """Counts and rates when ``score >= threshold`` means positive."""
    y, s = _check(labels, scores)
    called = s >= threshold
    tp, fn = int((called & y).sum()), int((~called & y).sum())
    tn, fp = int((~called & ~y).sum()), int((called & ~y).sum())
    return Confusion(float(threshold), tp / (tp + fn), tn / (tn + fp), tp, fn, tn, fp)


def wilson_interval(successes: int, total: int) -> tuple[float, float]:
    """The Wilson score 95% interval of the proportion *successes* / *total* (a
    sensitivity: true positives of all positives; a specificity: true negatives of all
    negatives)."""
    if total <= 0 or not 0 <= successes <= total:
        raise ValueError(f"{successes} of {total} is not a proportion")
    share = successes / total
    z2 = Z_95 * Z_95
    centre = (share + z2 / (2 * total)) / (1 + z2 / total)
    half = Z_95 * math.sqrt(share * (1 - share) / total + z2 / (4 * total * total))
    half /= 1 + z2 / total
    return max(0.0, centre - half), min(1.0, centre + half)


def threshold_for_sensitivity(labels: np.ndarray, scores: np.ndarray, wanted: float) -> float:
    """The highest threshold whose sensitivity is at least *wanted*."""
    y, s = _check(labels, scores)
    positives = np.sort(s[y])[::-1]
    needed = math.ceil(wanted * len(positives) - 1e-9)
    return float(positives[max(needed, 1) - 1])


def threshold_for_specificity(labels: np.ndarray, scores: np.ndarray, wanted: float) -> float:
    """The lowest threshold whose specificity is at least *wanted* (``score >= t`` is positive)."""
    y, s = _check(labels, scores)
    negatives = np.sort(s[~y])
    needed = math.ceil(wanted * len(negatives) - 1e-9)
    if needed <= 0:
        return float(negatives[0])
    # Everything at or below negatives[needed - 1] must be called negative.
    cut = negatives[needed - 1]
    above = s[s > cut]
    return float(above.min()) if above.size else float(np.nextafter(cut, np.inf))


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1."""
    y, s = _check(labels, scores)
    best, best_j = float(s.max()), -1.0
    for t in np.unique(s):
        c = confusion(y, s, float(t))
        j = c.sensitivity + c.specificity - 1
        if j > best_j:
            best, best_j = float(t), j
    return best


def roc_points(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(false positive rate, true positive rate) from (0, 0) to (1, 1), one per distinct score."""
    y, s = _check(labels, scores)
    points = [(0.0, 0.0)]
    for t in np.unique(s)[::-1]:
        c = confusion(y, s, float(t))
        points.append((1 - c.specificity, c.sensitivity))
    points.append((1.0, 1.0))
    return np.asarray(points)


def calibration_table(
    labels: np.ndarray, scores: np.ndarray, bins: int = 10
) -> list[tuple[float, float, int, float, float]]:
    """Per score bin with cases in it: (low, high, cases, mean predicted, observed positive
    fraction). Equal-width bins over [0, 1], the last one closed. One class is enough: a site
    with no fracture in a month still has a calibration to look at."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape or not len(y):
        raise ValueError("labels and scores must be non-empty and of one length")
    index = calibration_bins(s, bins)
    edges = np.linspace(0, 1, bins + 1)
    rows = []
    for number, (low, high) in enumerate(itertools.pairwise(edges)):
        inside = index == number
        if inside.any():
            rows.append(
                (
                    float(low),
                    float(high),
                    int(inside.sum()),
                    float(s[inside].mean()),
                    float(y[inside].mean()),
                )
            )
    return rows


def calibration_bins(scores: np.ndarray, bins: int = 10) -> np.ndarray:
    """Each score's bin of :func:`calibration_table`: equal-width bins over [0, 1], each
    closed below and open above, the last one closed (-1 for a score outside [0, 1])."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    index = np.full(s.shape, -1, dtype=np.int64)
    for number, (low, high) in enumerate(itertools.pairwise(np.linspace(0, 1, bins + 1))):
        index[(s >= low) & ((s < high) if high < 1 else (s <= high))] = number
    return index
