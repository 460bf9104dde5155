"""Metrics against independent brute-force references."""

from __future__ import annotations

import numpy as np
import pytest

from triage_node.training.statistics import (
    auroc,
    calibration_table,
    confusion,
    paired_auroc_difference,
    roc_points,
    threshold_for_sensitivity,
    threshold_for_specificity,
    wilson_interval,
    youden_threshold,
)


def cases(seed: int, n: int = 300, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    s = rng.normal(0, 1, n) + 1.2 * y
    if ties:
        s = np.round(s, 1)
    return y, 1 / (1 + np.exp(-s))


def psi(x: float, yv: float) -> float:
    return 1.0 if x > yv else 0.5 if x == yv else 0.0


def brute_auroc_and_se(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """The O(m*n) definitions: Mann-Whitney and DeLong's structural components."""
    pos, neg = s[y], s[~y]
    matrix = np.array([[psi(p, q) for q in neg] for p in pos])
    v10, v01 = matrix.mean(axis=1), matrix.mean(axis=0)
    se = np.sqrt(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg))
    return float(matrix.mean()), float(se)


@pytest.mark.parametrize(("seed", "ties"), [(0, False), (1, True), (2, True)])
def test_auroc_and_delong_interval_match_the_definitions(seed: int, ties: bool) -> None:
    y, s = cases(seed, ties=ties)
    value, se = brute_auroc_and_se(y, s)
    result = auroc(y, s)
    assert result.value == pytest.approx(value, abs=1e-12)
    assert result.low == pytest.approx(value - 1.959963984540054 * se, abs=1e-9)
    assert result.high == pytest.approx(min(1.0, value + 1.959963984540054 * se), abs=1e-9)


def brute_paired_difference(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """DeLong et al. 1988's paired variance from the O(m*n) components: the 2x2 covariance of
    each model's positive and negative components, Var(A - B) = S11 + S22 - 2 S12."""

    def components(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        matrix = np.array([[psi(p, q) for q in s[~y]] for p in s[y]])
        return matrix.mean(axis=1), matrix.mean(axis=0)

    (a10, a01), (b10, b01) = components(a), components(b)
    s10, s01 = np.cov(np.vstack([a10, b10])), np.cov(np.vstack([a01, b01]))
    m, n = len(a10), len(a01)
    variance = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (
        s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]
    ) / n
    return float(a10.mean() - b10.mean()), float(np.sqrt(variance))


@pytest.mark.parametrize(("seed", "ties"), [(3, False), (4, True)])
def test_paired_auroc_difference_matches_the_definitions(seed: int, ties: bool) -> None:
    y, a = cases(seed, ties=ties)
    rng = np.random.default_rng(seed + 10)
    b = a + rng.normal(0, 0.15, a.shape)  # a correlated second model, as two folds' networks
    if ties:
        b = np.round(b, 1)
    difference, se = brute_paired_difference(y, a, b)
    result = paired_auroc_difference(y, a, b)
    assert result.difference == pytest.approx(auroc(y, a).value - auroc(y, b).value, abs=1e-12)
    assert result.difference == pytest.approx(difference, abs=1e-12)
    assert result.low == pytest.approx(difference - 1.959963984540054 * se, abs=1e-9)
    assert result.high == pytest.approx(difference + 1.959963984540054 * se, abs=1e-9)
    assert 0 < result.p_value < 1


def test_paired_difference_is_surer_than_either_interval_and_zero_for_one_model() -> None:
    y, a = cases(5, n=400)
    b = a + np.random.default_rng(6).normal(0, 0.05, a.shape)
    paired = paired_auroc_difference(y, a, b)
    assert paired.high - paired.low < (auroc(y, a).high - auroc(y, a).low) / 2
    same = paired_auroc_difference(y, a, a)
    assert (same.difference, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    strong = paired_auroc_difference(y, a, np.random.default_rng(7).random(a.shape))
    assert strong.low > 0 and strong.p_value < 1e-6  # a model against noise
    with pytest.raises(ValueError, match="two cases of each class"):
        paired_auroc_difference(np.array([0, 0, 1]), np.array([1, 2, 3]), np.array([3, 2, 1]))


def test_auroc_edge_values() -> None:
    assert auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])).value == 1.0
    assert auroc(np.array([0, 1]), np.array([0.5, 0.5])).value == 0.5
    with pytest.raises(ValueError, match="at least one positive and one negative"):
        auroc(np.array([1, 1]), np.array([0.2, 0.3]))


@pytest.mark.parametrize("wanted", [0.8, 0.9, 0.95])
def test_operating_point_thresholds_are_the_extreme_ones(wanted: float) -> None:
    y, s = cases(3)
    candidates = np.unique(s)
    sens_ok = [t for t in candidates if confusion(y, s, t).sensitivity >= wanted]
    assert threshold_for_sensitivity(y, s, wanted) == max(sens_ok)
    spec_ok = [t for t in candidates if confusion(y, s, t).specificity >= wanted]
    assert threshold_for_specificity(y, s, wanted) == min(spec_ok)


def test_youden_maximises_j() -> None:
    y, s = cases(4)
    best = max(
        confusion(y, s, t).sensitivity + confusion(y, s, t).specificity for t in np.unique(s)
    )
    c = confusion(y, s, youden_threshold(y, s))
    assert c.sensitivity + c.specificity == pytest.approx(best)


def test_roc_and_calibration_shapes() -> None:
    y, s = cases(5)
    points = roc_points(y, s)
    assert tuple(points[0]) == (0.0, 0.0) and tuple(points[-1]) == (1.0, 1.0)
    assert np.all(np.diff(points[:, 0]) >= 0) and np.all(np.diff(points[:, 1]) >= 0)
    area = float(np.trapezoid(points[:, 1], points[:, 0]))
    assert area == pytest.approx(auroc(y, s).value, abs=1e-9)
    table = calibration_table(y, s)
    assert sum(row[2] for row in table) == len(y)


def test_wilson_interval_against_closed_forms() -> None:
    """0 of n: the upper bound is z^2 / (n + z^2); n of n mirrors it; k of n mirrors n-k of n."""
    z2 = 1.959963984540054**2
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(z2 / (10 + z2))
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + z2), 1.0))
    low, high = wilson_interval(90, 104)
    mirror_low, mirror_high = wilson_interval(14, 104)
    assert (low, high) == pytest.approx((1 - mirror_high, 1 - mirror_low))
    assert low < 90 / 104 < high
    # The score interval solves |p - share| = z * sqrt(p (1 - p) / n) at both bounds.
    for bound in (low, high):
        assert abs(bound - 90 / 104) == pytest.approx((z2 * bound * (1 - bound) / 104) ** 0.5)


def test_wilson_interval_narrows_with_more_cases_and_refuses_non_proportions() -> None:
    small, large = wilson_interval(9, 10), wilson_interval(900, 1000)
    assert large[1] - large[0] < small[1] - small[0]
    for successes, total in ((1, 0), (-1, 5), (6, 5)):
        with pytest.raises(ValueError, match="not a proportion"):
            wilson_interval(successes, total)
