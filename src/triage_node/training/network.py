"""The fracture network (torch; training only, never imported on the run-time path).

A small residual CNN made to be trained from scratch on a CPU: a strided stem, four stages of
basic residual blocks, then a 1x1 convolution that maps the last features to one logit per
location. That map *is* the class-activation map (Zhou et al. 2016): the image logit is its
global average, so the CAM is exact and costs nothing extra. The exported graph returns both
``probability`` (N, 1) = sigmoid(mean(CAM)) and ``cam`` (N, 1, h, w).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from triage_node.training.backbone import Pooling, pool_logits


@dataclass(frozen=True, slots=True)
class NetSpec:
    """The shape of the network; kept in the checkpoint and the manifest."""

    widths: tuple[int, ...] = (32, 64, 128, 256)
    blocks: tuple[int, ...] = (1, 1, 2, 1)
    stem: int = 24
    in_channels: int = 1
    dropout: float = 0.2
    # 1 keeps the last stage at the resolution of the one before: a CAM twice as fine (stride 16
    # with four stages), which fracture boxes of a few percent of the image need.
    last_stride: int = 1

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.blocks) or not self.widths:
            raise ValueError("widths and blocks must be non-empty and of the same length")
        if min(self.widths) < 1 or min(self.blocks) < 1 or self.stem < 1:
            raise ValueError("widths, blocks and stem must be positive")
        if self.last_stride not in (1, 2):
            raise ValueError("last_stride must be 1 or 2")

    @property
    def stride(self) -> int:
        """Input pixels per CAM cell."""
        return int(2 ** len(self.widths) * self.last_stride)


def _conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut (He et al. 2016); stride 2 halves the map."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(cin, cout, stride), nn.ReLU(inplace=True), *_conv_bn(cout, cout)
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.relu(self.body(x) + self.shortcut(x))
        return out


class FractureNet(nn.Module):
    def __init__(self, spec: NetSpec = NetSpec()) -> None:
        super().__init__()
        self.spec = spec
        layers: list[nn.Module] = [*_conv_bn(spec.in_channels, spec.stem, 2), nn.ReLU(inplace=True)]
        cin = spec.stem
        last = len(spec.widths) - 1
        for stage, (width, count) in enumerate(zip(spec.widths, spec.blocks, strict=True)):
            first_stride = spec.last_stride if stage == last else 2
            for index in range(count):
                layers.append(BasicBlock(cin, width, first_stride if index == 0 else 1))
                cin = width
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout2d(spec.dropout)
        self.head = nn.Conv2d(cin, 1, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Zero the last BN of each residual body: every block starts as the identity (Goyal et al.).
        for module in self.modules():
            if isinstance(module, BasicBlock):
                last_bn = module.body[-1]
                if isinstance(last_bn, nn.BatchNorm2d) and last_bn.weight is not None:
                    nn.init.zeros_(last_bn.weight)
        nn.init.normal_(self.head.weight, 0, 0.01)
        if self.head.bias is not None:
            nn.init.zeros_(self.head.bias)

    def cam_from_features(self, features: torch.Tensor) -> torch.Tensor:
        cam: torch.Tensor = self.head(self.dropout(features))
        return cam

    def cam(self, x: torch.Tensor, frozen_blocks: int = 0) -> torch.Tensor:
        """Class-activation map (N, 1, h, w): the logit of each location (nothing is frozen in
        a network trained from scratch; the argument matches :class:`PretrainedNet`)."""
        return self.cam_from_features(self.features(x))

    def frozen_modules(self, frozen_blocks: int) -> list[nn.Module]:
        return []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image logits (N,)."""
        return self.cam(x).mean(dim=(1, 2, 3))


class ExportWrapper(nn.Module):
    """What goes into the ONNX file: ``probability`` (N, 1), ``cam`` (N, 1, h, w) and, with a
    *whitening*, ``ood_score`` (N, 1).

    The probability is ``sigmoid(scale * pool(cam) + shift)``: the Platt calibration fitted on
    validation is part of the graph, so what the node reports is the calibrated probability.
    The CAM stays the network's logit map (calibration is monotone; the peak does not move).
    ``ood_score`` is the Mahalanobis distance of the pooled features
    (:mod:`triage_node.training.ood`).
    """

    def __init__(
        self,
        net: nn.Module,
        pooling: Pooling | None = None,
        platt: tuple[float, float] = (1.0, 0.0),
        whitening: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        super().__init__()
        self.net: Any = net  # FractureNet or PretrainedNet: features() and cam_from_features()
        self.pooling = pooling or Pooling()
        self.scale, self.shift = float(platt[0]), float(platt[1])
        self.with_ood = whitening is not None
        if whitening is not None:
            mean, matrix = whitening
            self.register_buffer("ood_mean", torch.as_tensor(mean, dtype=torch.float32))
            self.register_buffer("ood_matrix", torch.as_tensor(matrix, dtype=torch.float32))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.net.features(image)
        cam = self.net.cam_from_features(features)
        logit = pool_logits(cam, self.pooling).unsqueeze(1)
        probability = torch.sigmoid(logit * self.scale + self.shift)
        if not self.with_ood:
            return probability, cam
        z = (features.mean(dim=(2, 3)) - self.ood_mean) @ self.ood_matrix
        score = (z * z).sum(dim=1, keepdim=True) / z.shape[1]
        return probability, cam, score


def spec_from_dict(values: dict[str, object]) -> NetSpec:
    def ints(key: str) -> tuple[int, ...]:
        raw = values[key]
        if not isinstance(raw, Sequence):
            raise ValueError(f"{key} must be a list of integers")
        return tuple(int(v) for v in raw)

    return NetSpec(
        widths=ints("widths"),
        blocks=ints("blocks"),
        stem=int(str(values["stem"])),
        in_channels=int(str(values["in_channels"])),
        dropout=float(str(values["dropout"])),
        last_stride=int(str(values.get("last_stride", 2))),
    )
