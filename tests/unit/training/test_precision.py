"""Training steps in bfloat16 (``--precision bf16``): autocast for the steps only, float32
weights, a run of its own for --resume, and the CPU check behind its warning."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="torch (the 'train' extra) is not installed")

from tests.support.tiny_training import tiny_images, tiny_run  # noqa: E402
from triage_node.errors import ModelError  # noqa: E402
from triage_node.training import loop  # noqa: E402
from triage_node.training.loop import fit  # noqa: E402
from triage_node.training.precision import native_bf16, step_precision  # noqa: E402
from triage_node.training.settings import TrainConfig, fingerprint, same_run  # noqa: E402

CPU = torch.device("cpu")


def test_native_bf16_reads_the_cpu_flags(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\n")
    assert native_bf16(CPU, cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 amx_bf16 amx_tile\n")
    assert native_bf16(CPU, cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    assert not native_bf16(CPU, cpuinfo)
    cpuinfo.write_text("model name\t: avx512_bf16 in a name is not a flag\n")
    assert not native_bf16(CPU, cpuinfo)
    assert not native_bf16(CPU, tmp_path / "absent")


def test_bf16_steps_compute_in_bfloat16_and_fp32_steps_do_not() -> None:
    conv = torch.nn.Conv2d(1, 4, 3)
    x = torch.rand(2, 1, 8, 8)
    with step_precision(CPU, "bf16"):
        assert conv(x).dtype == torch.bfloat16
    with step_precision(CPU, "fp32"):
        assert conv(x).dtype == torch.float32
    assert conv.weight.dtype == torch.float32


def test_a_bf16_run_learns_keeps_float32_weights_and_is_a_run_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(1)
    config = tiny_run(tmp_path, epochs=3, box_loss=0.5, precision="bf16")
    messages: list[str] = []
    monkeypatch.setattr(loop, "native_bf16", lambda device: False)
    net, best = fit(
        tiny_images(32, 0), tiny_images(16, 1), config, messages.append, None, tmp_path / "s.pt"
    )
    assert any("no native bfloat16" in m for m in messages)
    assert best["auroc"] > 0.8  # the bright bar is learned in bfloat16 steps too
    assert {p.dtype for p in net.parameters()} == {torch.float32}
    assert {b.dtype for b in net.buffers() if b.is_floating_point()} == {torch.float32}

    as_fp32 = dataclasses.replace(config, precision="fp32", epochs=4)
    with pytest.raises(ModelError, match="other settings"):
        fit(
            tiny_images(32, 0),
            tiny_images(16, 1),
            as_fp32,
            messages.append,
            None,
            tmp_path / "s.pt",
        )


def test_precision_is_checked_and_older_checkpoints_were_fp32(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--precision must be one of"):
        TrainConfig(data=tmp_path, out=tmp_path, precision="fp16").check()
    config = TrainConfig(data=tmp_path, out=tmp_path)
    older = {k: v for k, v in fingerprint(config).items() if k != "precision"}
    assert same_run(older, config)
    assert not same_run(older, dataclasses.replace(config, precision="bf16"))
