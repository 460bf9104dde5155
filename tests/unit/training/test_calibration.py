"""Platt scaling, expected calibration error and the Mahalanobis scope guard (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from triage_node.training.calibration import Platt, expected_calibration_error, fit_platt, logit
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
