"""A tiny training problem for the training loop's tests: 32 px images where the fractured
ones carry a bright bar inside their box, and a two-stage network that learns it in seconds
(needs torch: import it only from tests that skip without it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from triage_node.training.images import Images
from triage_node.training.network import NetSpec
from triage_node.training.settings import TrainConfig


def tiny_images(count: int, seed: int) -> Images:
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(count) % 2).float()
    pixels = torch.rand(count, 1, 32, 32, generator=g) * 0.3
    pixels[labels == 1, :, 10:14, 8:24] += 0.6  # a bright bar: something to learn
    boxes = torch.zeros(count, 1, 32, 32, dtype=torch.bool)
    boxes[labels == 1, :, 8:16, 8:24] = True
    areas = torch.tensor([[0, 0, 32, 32]] * count)
    return Images(pixels.half(), areas, labels, boxes)


def tiny_run(tmp_path: Path, **settings: Any) -> TrainConfig:
    """A two-stage network on 32 px images, one thread: seconds per epoch."""
    tiny = NetSpec(widths=(16, 16), blocks=(1, 1), stem=16)
    return TrainConfig(
        **{
            "data": tmp_path,
            "out": tmp_path,
            "size": 32,
            "net": tiny,
            "min_epochs": 1,
            "batch_size": 8,
            "threads": 1,
            **settings,
        }
    )
