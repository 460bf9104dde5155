"""Several ``triage-node train`` recipes side by side on one machine (a GPU), within a time limit.

Each recipe is a ``triage-node train`` argument list, parsed by the command's own parser, so a
recipe here is exactly the run that command line would make. Each runs in its own process: it
reads its images once, fits the network on the standard split (a checkpoint each epoch; the
finished state is then compacted to its best network, so that ``triage-node train <the same
arguments> --resume`` finalises it on another machine), then trains its cross-validation folds
one at a time while the time left is enough for one more. What a recipe finished is in
``OUT/NAME/`` (``train-state.pt``, ``train-log.jsonl``, ``cross-validation.json``, ``log.txt``);
the summary of all of them is ``OUT/sweep.json``.

    python scripts/train_sweep.py --data ../shared/data/fracatlas --out runs/sweep --minutes 8 \\
        --recipe q "--backbone efficientnet-lite0 --size 384 --augment flip --device cuda" ...

``--smoke`` runs the whole path (fit, compaction, one fold) on a few images for one epoch first,
so a machine that cannot run it says so in seconds rather than after the images are read.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from triage_node.cli.training_commands import add_train_parser, train_config


def recipe_config(data: Path, out: Path, arguments: str) -> Any:
    """The TrainConfig that ``triage-node train --data DATA --out OUT ARGUMENTS`` would run."""
    parser = argparse.ArgumentParser(prog="triage-node")
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["train", "--data", str(data), "--out", str(out), *shlex.split(arguments)]
    )
    return train_config(args)


def run_recipe(data: Path, out: Path, arguments: str, deadline: float, smoke: bool) -> None:
    """One recipe, in this process: fit on the standard split, then folds while time allows."""
    import dataclasses

    import torch

    from triage_node.training.finalise import read_training_images, split_folder
    from triage_node.training.loop import STATE_FILE, compact_state, cross_validate, fit

    config = recipe_config(data, out, arguments)
    if smoke:
        config = dataclasses.replace(config, epochs=1, min_epochs=1, freeze_epochs=0, folds=2)
    torch.set_num_threads(config.threads or 2)
    torch.backends.cudnn.benchmark = True  # one input size throughout
    out.mkdir(parents=True, exist_ok=True)

    def report(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)

    splits = split_folder(config, report)
    if smoke:
        splits = {name: part[:48] for name, part in splits.items()}
    order, images, train_images, validation_images = read_training_images(splits, config, report)
    started = time.monotonic()
    _, best = fit(
        train_images, validation_images, config, report, out / "train-log.jsonl", out / STATE_FILE
    )
    compact_state(out / STATE_FILE)
    took = time.monotonic() - started
    report(f"fit: best validation AUROC {best['auroc']:.4f}, epoch {best['epoch']}, {took:.0f} s")
    for fold in range(1, config.folds + 1):
        if time.time() + 1.1 * took > deadline:
            left = deadline - time.time()
            report(f"no time for fold {fold}: {left:.0f} s left, a fit took {took:.0f} s")
            break
        started = time.monotonic()
        summary = cross_validate(order, images, config, report, out, only={fold})
        took = max(took, time.monotonic() - started)
        report(f"after fold {fold}: {summary}")
        if smoke:
            break


def _summary(out: Path, recipes: dict[str, str]) -> dict[str, Any]:
    import torch

    from triage_node.training.loop import STATE_FILE

    document: dict[str, Any] = {}
    for name, arguments in recipes.items():
        folder = out / name
        log = folder / "train-log.jsonl"
        cv = folder / "cross-validation.json"
        epochs = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
        state = folder / STATE_FILE
        finished = state.is_file() and bool(
            torch.load(state, map_location="cpu", weights_only=False).get("finished")
        )  # a fit stopped mid-way leaves a full state, which compact_state has not marked
        best = next((e for e in reversed(epochs) if e["epoch"] == e["best_epoch"]), None)
        document[name] = {
            "arguments": arguments,
            "fit_finished": finished,
            "best_epoch": best,
            "epochs": epochs,
            "cross_validation": json.loads(cv.read_text())["folds"] if cv.is_file() else {},
        }
    return document


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=8.0, help="time for the whole sweep")
    parser.add_argument("--recipe", nargs=2, action="append", metavar=("NAME", "ARGUMENTS"))
    parser.add_argument("--smoke", action="store_true", help="a few images, one epoch, first")
    parser.add_argument("--worker", nargs=2, metavar=("NAME", "ARGUMENTS"), help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, arguments = args.worker
        run_recipe(args.data, args.out / name, arguments, args.deadline, args.smoke)
        return 0
    recipes = dict(args.recipe or [])
    if not recipes:
        parser.error("give at least one --recipe NAME ARGUMENTS")
    if args.smoke:
        name, arguments = next(iter(recipes.items()))
        smoke = subprocess.run(
            [
                *(
                    sys.executable,
                    __file__,
                    "--data",
                    str(args.data),
                    "--out",
                    str(args.out / "smoke"),
                ),
                *("--worker", name, arguments, "--deadline", str(time.time() + 120), "--smoke"),
            ],
            check=False,
        )
        if smoke.returncode:
            print("smoke run failed: not starting the sweep", file=sys.stderr)
            return smoke.returncode
    deadline = time.time() + 60 * args.minutes
    args.out.mkdir(parents=True, exist_ok=True)
    workers = {}
    for name, arguments in recipes.items():
        (args.out / name).mkdir(parents=True, exist_ok=True)
        log = open(args.out / name / "log.txt", "a", encoding="utf-8")  # noqa: SIM115
        command = [sys.executable, __file__, "--data", str(args.data), "--out", str(args.out)]
        command += ["--worker", name, arguments, "--deadline", str(deadline)]
        workers[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    while any(w.poll() is None for w in workers.values()) and time.time() < deadline:
        time.sleep(2)
    for name, worker in workers.items():
        if worker.poll() is None:
            print(f"{name}: out of time, stopped", flush=True)
            worker.terminate()
            worker.wait(30)
        elif worker.returncode:
            tail = (args.out / name / "log.txt").read_text(encoding="utf-8")[-3000:]
            print(f"{name}: failed ({worker.returncode}):\n{tail}", flush=True)
    document = _summary(args.out, recipes)
    (args.out / "sweep.json").write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    for name, part in document.items():
        best = part["best_epoch"] or {}
        folds = {k: v["auroc"] for k, v in part["cross_validation"].items()}
        print(
            f"{name}: fit {'done' if part['fit_finished'] else 'NOT finished'}, best validation "
            f"AUROC {best.get('validation_auroc')} at epoch {best.get('epoch')}; folds {folds}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
