"""The arithmetic of the training steps: float32, or bfloat16 under autocast (training only).

With ``--precision bf16`` the forward and backward passes of each training step run under
``torch.autocast``: convolutions and matrix products in bfloat16, while the weights, the
optimiser's state, the moving average and the loss stay float32. Everything after the steps —
each epoch's validation scores, calibration, the scope guard, export and the parity check —
runs in float32 as before, so the bundled graph and its thresholds are float32 whatever the
training used. On CPUs with native bfloat16 (AVX512-BF16 or AMX) the steps take about half
the time (measured in docs/model-card.md); elsewhere oneDNN emulates it and they get slower.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

CPU_FLAGS = Path("/proc/cpuinfo")
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def step_precision(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    """The context a training step's forward pass runs in (its backward follows it)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def native_bf16(device: torch.device, cpuinfo: Path = CPU_FLAGS) -> bool:
    """Whether *device* computes bfloat16 natively (a CUDA device that says so; a CPU whose
    flags in /proc/cpuinfo name AVX512-BF16 or AMX; False where they cannot be read)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        text = cpuinfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return bool(NATIVE_BF16_FLAGS & set(value.split()))
    return False


__all__ = ["native_bf16", "step_precision"]
