"""Paired ingest comparison of two versions of the node: the one in this checkout against the
one in another (a commit checked out with ``git worktree add ../base <commit>``).

Receiving speed on these 2-core virtual machines drifts by up to 2x within minutes (the disk's
fsync time and the host's load change), so a change worth 5-15% cannot be seen by measuring
before and after. Here the two versions take turns, alternating which goes first in each
round: a fresh node (receive only, as in ingest.py), once the disk has written what the last
run left, takes the same set from the same ``storescu``; the median of the paired ratios
(this / other) is what the change is worth. The other version runs from its own source tree
with this checkout's virtual environment (``PYTHONPATH``), so it must need no other packages.

    .venv/bin/python benchmarks/ingest_ab.py ../base/src [--set small|large] [--senders 1]
        [--rounds 8] [--transport pynetdicom|dcmtk]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from ingest import CACHE, dataset, measure_triage_node, settled  # noqa: E402

SETS = {"small": ("small", 500, 512, 512), "large": ("large", 30, 2000, 2500)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="the other version's src/ directory")
    parser.add_argument("--set", choices=sorted(SETS), default="small")
    parser.add_argument("--senders", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--transport", choices=("pynetdicom", "dcmtk"), default="pynetdicom")
    args = parser.parse_args()
    other = args.other.resolve()
    if not (other / "triage_node" / "__init__.py").is_file():
        parser.error(f"{other} holds no triage_node package")
    files = dataset(*SETS[args.set])
    sources = {"other": other, "this": REPO / "src"}
    rates: dict[str, list[float]] = {"this": [], "other": []}
    cpu: dict[str, list[float]] = {"this": [], "other": []}
    with tempfile.TemporaryDirectory(prefix="ingest-ab-", dir=CACHE) as tmp:
        for round_ in range(args.rounds):
            for name in ("other", "this") if round_ % 2 == 0 else ("this", "other"):
                work = Path(tmp) / f"{name}-{round_}"
                seconds = settled(
                    measure_triage_node,
                    files,
                    args.senders,
                    work,
                    sources[name],
                    cpu[name],
                    args.transport,
                )
                rates[name].append(len(files) / seconds)
    milliseconds = {name: [1000 * c / len(files) for c in cpu[name]] for name in cpu}
    print(
        f"{args.set} set, {args.senders} sender(s), {args.transport} transport,"
        f" {args.rounds} rounds:"
    )
    report("instances/s", rates)
    report("the node's CPU ms per instance", milliseconds)
    return 0


def report(what: str, values: dict[str, list[float]]) -> None:
    """Both versions' figures and the median of their paired ratios (this / other)."""
    ratios = [this / other for this, other in zip(values["this"], values["other"], strict=True)]
    print(f"  {what}:")
    for name in ("other", "this"):
        print(f"    {name:<5} {' '.join(f'{v:6.2f}' for v in values[name])}")
    print(
        f"    this / other: median of paired ratios {statistics.median(ratios):.3f}"
        f" (each: {' '.join(f'{r:.2f}' for r in ratios)})"
    )


if __name__ == "__main__":
    raise SystemExit(main())
