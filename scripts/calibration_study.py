"""How far a Platt calibration fitted on one split can hold on another, from the CV record alone.

The bundled model's calibration is fitted on the validation split (520 images, 72 fractured) and
its expected calibration error (ECE) is reported on the test split (520, 104 fractured). This
asks, without the test split, what ECE such a calibration can be expected to show there. It
reads the held-out logits that cross-validation records (``cross-validation.json``: each fold's
network scored on the blocks it did not train on) and prints:

- the **floor**: the ECE of probabilities that are calibrated by construction (labels drawn
  from them) on as many images as the test split has: what sampling alone gives;
- for each fold, Platt fitted on **half of its blocks** (the same network, as the validation
  split is for the bundled model) and measured on the other half; the same with the intercept
  moved so that the mean probability matches the prevalence of everything else that is not
  measured (a prior correction towards the larger sample's prevalence); and Platt fitted on
  **the other folds' logits** (other networks, four times the images), measured on the same
  halves. Repeated over random halvings; means printed.

Blocks are the split's (consecutive image ids), so a half differs from the other as the
validation split differs from the test split. Nothing here is used at run time; the figures
are in the model card.

    .venv/bin/python scripts/calibration_study.py --data ../shared/data/fracatlas \\
        --record models/fracture-v3/evaluation/cross-validation.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from triage_node.training.calibration import Platt, expected_calibration_error, fit_platt
from triage_node.training.folders import _blocks, block_split, load_folder


def prior_corrected(platt: Platt, logits: np.ndarray, prevalence: float) -> Platt:
    """*platt* with its shift moved so that its mean probability on *logits* is *prevalence*."""
    low, high = -10.0, 10.0
    for _ in range(60):  # the mean probability rises with the shift: bisection
        middle = (low + high) / 2
        if Platt(platt.scale, platt.shift + middle).apply(logits).mean() < prevalence:
            low = middle
        else:
            high = middle
    return Platt(platt.scale, platt.shift + (low + high) / 2)


def fitted(logits: np.ndarray, labels: np.ndarray) -> Platt | None:
    """Platt fitted to these, or None where it cannot be (one class; logits that do not rank)."""
    try:
        return fit_platt(logits, labels)
    except ValueError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--record", type=Path, required=True, help="cross-validation.json")
    parser.add_argument("--folds", type=int, default=5, help="the record's fold count")
    parser.add_argument("--repeats", type=int, default=200, help="random halvings per fold")
    args = parser.parse_args()

    record = json.loads(args.record.read_text(encoding="utf-8"))
    fingerprint, done = record["fingerprint"], record["folds"]
    examples = load_folder(args.data)
    block, seed = fingerprint["block_size"], fingerprint["seed"]
    splits = block_split(examples, tuple(fingerprint["fractions"]), block_size=block, seed=seed)
    pool = splits["train"] + splits["validation"]  # what cross-validation divides
    # the blocks each fold held out, as block_folds deals them (block i to fold i mod k)
    dealt = _blocks(pool, block, seed)
    rng = np.random.default_rng(0)

    logits = {k: np.array(list(f["held_logits"].values())) for k, f in done.items()}
    truth = {e.image_id: e.label for e in pool}
    labels = {k: np.array([truth[i] for i in f["held_logits"]]) for k, f in done.items()}
    every = np.concatenate(list(logits.values()))
    reference = fitted(every, np.concatenate(list(labels.values()))) or Platt()
    half = len(every) // len(done) // 2
    for size, what in ((len(splits["test"]), "the test split's size"), (half, "half a fold")):
        drawn = [reference.apply(rng.choice(every, size)) for _ in range(2000)]
        floor = [expected_calibration_error(rng.random(size) < p, p) for p in drawn]
        print(
            f"floor, {size} images ({what}): calibrated by construction, ECE mean "
            f"{np.mean(floor):.3f}, 90th percentile {np.quantile(floor, 0.9):.3f}"
        )
    print("fold  images  fractured  half: own Platt  own, prior-corrected  other folds' Platt")
    rows = []
    for k in sorted(done, key=int):
        position = {i: n for n, i in enumerate(done[k]["held_logits"])}
        blocks = [
            np.array([position[e.image_id] for e in part])
            for index, part in enumerate(dealt)
            if index % args.folds == int(k) - 1
        ]
        z, y = logits[k], labels[k]
        others = [j for j in done if j != k]
        other_z = np.concatenate([np.empty(0)] + [logits[j] for j in others])
        other_y = np.concatenate([np.empty(0, int)] + [labels[j] for j in others])
        pooled = fitted(other_z, other_y) if others else None
        own, corrected, across = [], [], []
        for _ in range(args.repeats):
            order = rng.permutation(len(blocks))
            fit = np.concatenate([blocks[i] for i in order[: len(blocks) // 2]])
            measure = np.concatenate([blocks[i] for i in order[len(blocks) // 2 :]])
            platt = fitted(z[fit], y[fit])
            if platt is None:  # a half without fractures, or a network that does not rank
                continue
            own.append(expected_calibration_error(y[measure], platt.apply(z[measure])))
            prevalence = float(np.concatenate([y[fit], other_y]).mean())
            moved = prior_corrected(platt, z[fit], prevalence)
            corrected.append(expected_calibration_error(y[measure], moved.apply(z[measure])))
            if pooled is not None:
                across.append(expected_calibration_error(y[measure], pooled.apply(z[measure])))
        rows.append(tuple(float(np.mean(e)) if e else np.nan for e in (own, corrected, across)))
        print(
            f"{k:>4s}  {len(z):6d}  {int(y.sum()):9d}  {rows[-1][0]:15.3f}  "
            f"{rows[-1][1]:20.3f}  {rows[-1][2]:18.3f}"
        )
    mean = np.nanmean(np.array(rows), axis=0)
    print(f"mean{'':24s}{mean[0]:15.3f}  {mean[1]:20.3f}  {mean[2]:18.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
