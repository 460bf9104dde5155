"""Rebuild a finished run's state from a model directory, to re-finalise its network.

A model directory keeps its best network (``checkpoint.pt``) and its per-epoch record
(``train-log.jsonl``), not the run's ``train-state.pt``. This writes that state, compacted and
marked finished (as ``scripts/train_sweep.py`` leaves one), into a new directory, so that
``triage-node train <the model's own arguments> --out NEW --resume`` finalises the same network
again without training it: with other finalise-only settings (``--sensitivity-target``,
``--ood-pass-rate``, ``--scope``), or with ``--folds K`` to cross-validate the model's recipe
fold by fold (resumable; a ``cross-validation.json`` copied into ``NEW`` keeps the folds it has)
without fitting the network again.

    python scripts/state_from_model.py --model models/fracture-v3 \\
        --data ../shared/data/fracatlas --out runs/v3-oof \\
        --arguments "--backbone efficientnet-lite0 --size 384 ..."

The arguments must be the ones the model was trained with (its manifest's recipe says them):
the network is loaded into the network they describe, and a later ``--resume`` refuses a
state whose settings differ from its own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from train_sweep import recipe_config


def rebuild(model: Path, data: Path, out: Path, arguments: str) -> dict[str, object]:
    """Write ``out/train-state.pt`` for *model*; returns its record of the best epoch."""
    import torch

    from triage_node.training.images import build_net
    from triage_node.training.loop import STATE_FILE, compact_state
    from triage_node.training.settings import fingerprint

    config = recipe_config(data, out, arguments)
    checkpoint = torch.load(model / "checkpoint.pt", map_location="cpu", weights_only=False)
    net = build_net(config, pretrained=False)
    net.load_state_dict(checkpoint["state_dict"])  # refuses a network of other arguments
    log = (model / "train-log.jsonl").read_text()
    epochs = [json.loads(line) for line in log.splitlines()]
    best_epoch = epochs[-1]["best_epoch"]
    # a model refitted on train + validation (--refit) validated nothing: no AUROC per epoch
    best_auroc = next(
        e.get("validation_auroc", float("nan")) for e in epochs if e["epoch"] == best_epoch
    )
    best = {"auroc": float(best_auroc), "epoch": int(best_epoch)}
    out.mkdir(parents=True, exist_ok=True)
    state = {
        "fingerprint": fingerprint(config),
        "epoch": int(epochs[-1]["epoch"]),
        "best": best,
        "best_state": net.state_dict(),
    }
    torch.save(state, out / STATE_FILE)
    compact_state(out / STATE_FILE)  # marks it finished: --resume trains nothing more
    (out / "train-log.jsonl").write_text(log)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="model directory")
    parser.add_argument("--data", type=Path, required=True, help="its labelled image folder")
    parser.add_argument("--out", type=Path, required=True, help="new run directory")
    parser.add_argument("--arguments", required=True, help="its other train arguments")
    args = parser.parse_args()
    best = rebuild(args.model, args.data, args.out, args.arguments)
    print(f"{args.out / 'train-state.pt'}: best epoch {best['epoch']}, AUROC {best['auroc']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
