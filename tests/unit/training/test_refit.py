"""Finalising a network refitted on train + validation: out-of-fold logits, cross-fitted guard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="torch (the 'train' extra) is not installed")

from triage_node.errors import ModelError
from triage_node.training.finalise import cross_fitted_scores, out_of_fold_logits
from triage_node.training.folders import Example, block_folds
from triage_node.training.ood import fit_whitening
from triage_node.training.settings import TrainConfig


def examples(count: int) -> list[Example]:
    return [Example(f"IMG{i:04d}", Path(f"IMG{i:04d}.jpg"), int(i % 3 == 0)) for i in range(count)]


def test_out_of_fold_logits_come_in_the_examples_order_and_must_cover_them(tmp_path: Path) -> None:
    pool = examples(6)
    record = tmp_path / "cross-validation.json"
    folds = {
        "1": {"held_logits": {"IMG0000": 0.5, "IMG0003": -1.0, "IMG0005": 2.0}},
        "2": {"held_logits": {"IMG0001": 1.5, "IMG0002": -0.25, "IMG0004": 0.0}},
    }
    record.write_text(json.dumps({"folds": folds}))
    assert out_of_fold_logits(record, pool).tolist() == [0.5, 1.5, -0.25, -1.0, 0.0, 2.0]
    del folds["2"]
    record.write_text(json.dumps({"folds": folds}))
    with pytest.raises(ModelError, match="3 of 6 images have no held-out logit"):
        out_of_fold_logits(record, pool)
    with pytest.raises(ModelError, match="no held-out logits"):
        out_of_fold_logits(tmp_path / "missing.json", pool)
    record.write_text("[1, 2]")
    with pytest.raises(ModelError, match="no held-out logits"):
        out_of_fold_logits(record, pool)


def test_each_image_is_scored_by_a_guard_fitted_without_its_fold(tmp_path: Path) -> None:
    pool = examples(60)
    config = TrainConfig(data=tmp_path, out=tmp_path, folds=3, block_size=4, seed=1)
    features = np.random.default_rng(0).normal(size=(60, 5))
    features[7] += 40.0  # far from everything: its own fit would pull the mean towards it
    scores = cross_fitted_scores(features, pool, config)
    position = {e.image_id: i for i, e in enumerate(pool)}
    for kept, held in block_folds(pool, 3, block_size=4, seed=1):
        whitening = fit_whitening(features[[position[e.image_id] for e in kept]])
        rows = [position[e.image_id] for e in held]
        np.testing.assert_allclose(scores[rows], whitening.score(features[rows]))
    in_sample = fit_whitening(features).score(features)
    assert scores[7] > in_sample[7] and scores[7] == scores.max()
