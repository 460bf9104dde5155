"""Compare recipes by their cross-validation records, fold by fold, and their average.

Two recipes cross-validated with the same seed and block size hold out the same images in each
fold (``block_folds``), so their held-out logits are paired: the same image scored by two
networks that did not train on it. This reads two or more ``cross-validation.json`` records and
prints, for the folds every record has done:

- what differs between the recipes (their fingerprints);
- each fold's held-out AUROC (at the fold's kept epoch) and its AUROC by epoch, side by side;
- the pooled held-out AUROC of each recipe with its DeLong 95% interval, and its paired
  difference from the first recipe (DeLong's paired interval and p-value): far surer than
  comparing one validation split's AUROCs;
- the same for the recipes' **average** (each image's held-out logits averaged): what an
  ensemble of the recipes' networks would rank like, and, cross-fitted as it is, the logits a
  calibration of that ensemble would be fitted on.

A record with folds still to do is compared on the folds it has, so a cross-validation spread
over several sessions can be judged as it goes. Nothing here is used at run time; figures are
in the model card.

    .venv/bin/python scripts/compare_cv.py --data ../shared/data/fracatlas \\
        models/fracture-v3/evaluation/cross-validation.json runs/q448/cross-validation.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from triage_node.training.folders import load_folder
from triage_node.training.statistics import auroc, paired_auroc_difference


def flattened(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, inner in value.items():
        out.update(flattened(inner, f"{prefix}.{key}" if prefix else key))
    return out


NOT_RECORDED = "(not recorded)"  # a setting older records were written without


def differences(fingerprints: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The settings whose values are not the same in every fingerprint."""
    flat = [flattened(f) for f in fingerprints]
    keys = sorted(set().union(*flat))
    return {
        k: [f.get(k, NOT_RECORDED) for f in flat]
        for k in keys
        if len({json.dumps(f.get(k, NOT_RECORDED)) for f in flat}) > 1
    }


def common_folds(records: list[dict[str, Any]]) -> list[str]:
    """Folds every record has done, refusing records whose folds hold different images."""
    folds = sorted(set.intersection(*(set(r["folds"]) for r in records)), key=int)
    for fold in folds:
        held = [set(r["folds"][fold].get("held_logits", ())) for r in records]
        if any(h and held[0] and h != held[0] for h in held):
            raise SystemExit(
                f"fold {fold} holds out different images in these records: they were not made "
                "with the same seed, block size and data, so their folds are not paired"
            )
    return folds


def held_out(
    records: list[dict[str, Any]], folds: list[str], truth: dict[str, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Labels (n,) and each record's held-out logits (records, n) over *folds*, image-aligned."""
    ids = [i for fold in folds for i in records[0]["folds"][fold]["held_logits"]]
    missing = [i for i in ids if i not in truth]
    if missing:
        raise SystemExit(f"{len(missing)} held-out images are not in --data (e.g. {missing[0]})")
    merged = [
        {i: z for f in folds for i, z in r["folds"][f]["held_logits"].items()} for r in records
    ]
    return np.array([truth[i] for i in ids]), np.array([[m[i] for i in ids] for m in merged])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the folder the records used")
    parser.add_argument("records", type=Path, nargs="+", help="cross-validation.json files")
    parser.add_argument("--names", help="a name per record, comma-separated (default: folders)")
    args = parser.parse_args()
    if len(args.records) < 2:
        parser.error("compare at least two records")
    names = args.names.split(",") if args.names else [p.parent.name for p in args.records]
    if len(names) != len(args.records):
        parser.error("give one name per record")

    records = [json.loads(p.read_text(encoding="utf-8")) for p in args.records]
    print("settings that differ:")
    for key, values in differences([r["fingerprint"] for r in records]).items():
        print(f"  {key}: " + ", ".join(f"{n}={v}" for n, v in zip(names, values, strict=True)))
    folds = common_folds(records)
    if not folds:
        print("no fold is done in every record")
        return 1
    print(f"\nfolds done in every record: {', '.join(folds)}")
    for fold in folds:
        print(f"fold {fold}:")
        for name, record in zip(names, records, strict=True):
            done = record["folds"][fold]
            by_epoch = " ".join(f"{a:.3f}" for a in done.get("auroc_by_epoch", [])) or "-"
            print(
                f"  {name:<16} held-out AUROC {done['auroc']:.4f} (epoch {done['best_epoch']});"
                f" by epoch {by_epoch}"
            )

    paired = [f for f in folds if all("held_logits" in r["folds"][f] for r in records)]
    if paired != folds:
        print(
            "\nfolds without held-out logits in some record (recorded before they were kept):"
            f" {', '.join(f for f in folds if f not in paired)}; compared by AUROC above only"
        )
    if not paired:
        return 0
    folds = paired
    truth = {e.image_id: int(e.label) for e in load_folder(args.data)}
    labels, logits = held_out(records, folds, truth)
    per_fold = np.array([[r["folds"][f]["auroc"] for f in folds] for r in records])
    print(
        f"\npooled over those folds ({len(labels)} images, {int(labels.sum())} fractured;"
        " differences are from the first record, paired):"
    )
    rows = [*zip(names, logits, strict=True), ("average of all", logits.mean(axis=0))]
    for index, (name, scores) in enumerate(rows):
        result = auroc(labels, scores)
        line = f"  {name:<16} AUROC {result.value:.4f} ({result.low:.3f}-{result.high:.3f})"
        if index < len(records):
            line += f"  folds' mean {per_fold[index].mean():.4f}"
        if index > 0:
            against = paired_auroc_difference(labels, scores, logits[0])
            line += (
                f"  difference {against.difference:+.4f} ({against.low:+.3f} to"
                f" {against.high:+.3f}, p {against.p_value:.3f})"
            )
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
