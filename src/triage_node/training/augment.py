"""Training-time augmentation of a batch, in torch (training only).

Applied to model-sized [0, 1] images (after the runtime's own resize), on the whole batch at once so
it costs little beside the network: random flips, rotation, shift and zoom as one affine resampling
(Kim & MacKinnon 2018 used the same family), then brightness and contrast. Letterbox padding stays
black, as it is at run time. Target maps (fracture boxes) can go through the same geometric warp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class AugmentSpec:
    hflip: float = 0.5  # probability
    vflip: float = 0.2
    rotation_deg: float = 25.0
    shift: float = 0.08  # fraction of the side
    zoom: tuple[float, float] = (0.85, 1.2)
    brightness: float = 0.1  # added, +-
    contrast: tuple[float, float] = (0.75, 1.3)  # multiplied around mid-grey


AUGMENT_PRESETS = {
    "standard": AugmentSpec(),
    # milder geometry and intensity: small fractures stay where the boxes say, nearer the data
    "light": AugmentSpec(
        hflip=0.5,
        vflip=0.0,
        rotation_deg=10.0,
        shift=0.04,
        zoom=(0.95, 1.05),
        brightness=0.05,
        contrast=(0.9, 1.1),
    ),
    "flip": AugmentSpec(
        hflip=0.5,
        vflip=0.0,
        rotation_deg=0.0,
        shift=0.0,
        zoom=(1.0, 1.0),
        brightness=0.0,
        contrast=(1.0, 1.0),
    ),
}


def augment(
    images: torch.Tensor,
    masks: torch.Tensor,
    spec: AugmentSpec,
    generator: torch.Generator,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Augment (N, 1, S, S) images in [0, 1]; *masks* mark the image area inside the padding.

    The random draws use *generator* (a CPU generator) on every device.
    *targets* (N, C, S, S), when given, are warped with the same flips, rotation, shift and zoom
    (not brightness or contrast) and returned as extra channels after the image channel.
    """
    n, device = images.shape[0], images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    # The random draws come from the CPU generator whatever the device, so a run's augmentation
    # is the same on a GPU as on the CPU; only the warp itself runs where the images are.
    contrast = uniform(*spec.contrast).view(n, 1, 1, 1).to(device)
    brightness = uniform(-spec.brightness, spec.brightness).view(n, 1, 1, 1).to(device)
    x = ((images - 0.5) * contrast + 0.5 + brightness).clamp(0, 1) * masks
    if targets is not None:
        x = torch.cat([x, targets], dim=1)

    angle = uniform(-spec.rotation_deg, spec.rotation_deg) * (math.pi / 180)
    scale = 1 / uniform(*spec.zoom)  # the grid samples a smaller area to zoom in
    flip_x = torch.where(torch.rand(n, generator=generator) < spec.hflip, -1.0, 1.0)
    flip_y = torch.where(torch.rand(n, generator=generator) < spec.vflip, -1.0, 1.0)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip_x, -sin * flip_y
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip_x, cos * flip_y
    theta[:, 0, 2] = uniform(-spec.shift, spec.shift) * 2
    theta[:, 1, 2] = uniform(-spec.shift, spec.shift) * 2
    grid = F.affine_grid(theta.to(device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def localisation_loss(cam: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """How far the CAM's mass is from the fracture boxes, for images that have boxes.

    The CAM is turned into a distribution over its cells (spatial softmax) and the loss is
    -log of the share that falls on cells a box touches. Unlike a per-cell target it leaves the
    CAM's mean, which is the image logit, free; it only moves where the evidence sits.
    *boxes*: (N, 1, S, S) box masks in [0, 1] (after augmentation); images without a box count
    for nothing. Returns a scalar (0 when no image in the batch has a box).
    """
    touched = F.adaptive_max_pool2d(boxes, cam.shape[-2:]) > 0.5
    has_box = touched.flatten(1).any(dim=1)
    if not bool(has_box.any()):
        return cam.sum() * 0.0
    logits = cam[has_box].flatten(1)
    inside = touched[has_box].flatten(1)
    log_share = torch.logsumexp(
        logits.masked_fill(~inside, float("-inf")), dim=1
    ) - torch.logsumexp(logits, dim=1)
    return -log_share.mean()
