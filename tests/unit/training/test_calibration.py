"""Platt scaling, expected calibration error and the Mahalanobis scope guard (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from triage_node.training.calibration import (
    Platt,
    ece_if_calibrated,
    expected_calibration_error,
    fit_platt,
    logit,
)
from triage_node.training.ood import fit_whitening, threshold_for_pass_rate
from triage_node.training.statistics import calibration_table


def test_platt_recovers_a_known_miscalibration() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 20000)
    true = Platt(0.5, -1.0)
    labels = rng.random(z.size) < true.apply(z)
    fitted = fit_platt(z, labels)
    assert fitted.scale == pytest.approx(0.5, abs=0.05)
    assert fitted.shift == pytest.approx(-1.0, abs=0.06)
    raw = 1 / (1 + np.exp(-z))
    assert expected_calibration_error(labels, fitted.apply(z)) < 0.02
    assert expected_calibration_error(labels, raw) > 0.1


def test_platt_needs_both_classes_and_a_ranking() -> None:
    with pytest.raises(ValueError, match="both classes"):
        fit_platt(np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="do not rank"):
        fit_platt(np.array([3.0, 2.0, -2.0, -3.0]), np.array([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="positive"):
        Platt(0.0, 1.0)


def test_expected_calibration_error_by_hand() -> None:
    # Two bins: 0.15 predicted, 0 observed (4 cases); 0.85 predicted, all 4 positive.
    p = np.array([0.15] * 4 + [0.85] * 4)
    y = np.array([0] * 4 + [1] * 4)
    assert expected_calibration_error(y, p) == pytest.approx(0.15)
    np.testing.assert_allclose(logit(np.array([0.5])), [0.0])


def test_whitening_scores_typical_images_near_one_and_odd_ones_high() -> None:
    rng = np.random.default_rng(1)
    mixing = rng.normal(size=(16, 16))
    train = rng.normal(size=(4000, 16)) @ mixing
    whitening = fit_whitening(train, shrinkage=0.0)
    typical = whitening.score(rng.normal(size=(2000, 16)) @ mixing)
    assert typical.mean() == pytest.approx(1.0, abs=0.1)
    odd = whitening.score(rng.normal(size=(50, 16)) @ mixing + 8 * mixing[0])
    threshold = threshold_for_pass_rate(typical, 0.99)
    assert (typical <= threshold).mean() >= 0.99
    assert (odd > threshold).all()
    with pytest.raises(ValueError):
        fit_whitening(np.zeros((1, 4)))


def test_expected_calibration_error_of_one_class_and_its_table() -> None:
    """A month without a fracture still has a calibration: every 0.1 is 0.1 too high."""
    p = np.array([0.1] * 5 + [0.3] * 5)
    y = np.zeros(10, dtype=int)
    assert expected_calibration_error(y, p) == pytest.approx(0.2)
    assert [(n, round(f, 3)) for _, _, n, _, f in calibration_table(y, p)] == [(5, 0.0), (5, 0.0)]


def test_ece_from_sampling_alone_is_the_table_ece_of_labels_drawn_from_the_probabilities() -> None:
    rng = np.random.default_rng(3)
    p = rng.beta(0.5, 2.0, 400)
    mean, p95 = ece_if_calibrated(p, draws=1, seed=11)
    labels = np.random.default_rng(11).random((1, p.size)) < p  # the same draw
    assert mean == p95 == pytest.approx(expected_calibration_error(labels[0], p))
    assert ece_if_calibrated(p, draws=300, seed=5) == ece_if_calibrated(p, draws=300, seed=5)


def test_ece_from_sampling_alone_shrinks_with_more_images_and_is_zero_for_certainties() -> None:
    rng = np.random.default_rng(4)
    few, many = (
        ece_if_calibrated(rng.beta(0.5, 2.0, 100)),
        ece_if_calibrated(rng.beta(0.5, 2.0, 10000)),
    )
    assert many[0] < few[0] / 3
    assert few[0] < few[1]
    assert ece_if_calibrated(np.array([0.0, 1.0, 1.0, 0.0])) == (0.0, 0.0)


def test_a_miscalibration_stands_out_from_what_sampling_gives() -> None:
    """Half of these images are fractured though every probability says one in five."""
    p = np.full(520, 0.2)
    labels = np.arange(520) % 2 == 0
    assert expected_calibration_error(labels, p) == pytest.approx(0.3)
    _, p95 = ece_if_calibrated(p)
    assert p95 < 0.06
    with pytest.raises(ValueError, match="lie in"):
        ece_if_calibrated(np.array([0.5, 1.5]))
