"""The torch side of training: network, augmentation, ONNX export with its parity check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (the 'train' extra) is not installed")

from triage_node.augment import AugmentSpec, augment  # noqa: E402
from triage_node.errors import ModelError  # noqa: E402
from triage_node.infer import Model  # noqa: E402
from triage_node.net import FractureNet, NetSpec, spec_from_dict  # noqa: E402
from triage_node.onnxexport import PARITY_TOLERANCE, export_checked, parity, write_manifest  # noqa: E402
from triage_node.preprocess import InputSpec  # noqa: E402
from triage_node.training import TrainConfig, _load_init_weights  # noqa: E402

TINY = NetSpec(widths=(16, 16, 16, 16), blocks=(1, 1, 1, 1), stem=16)


def test_cam_is_exact_the_logit_is_its_mean() -> None:
    torch.manual_seed(0)
    net = FractureNet(TINY).eval()
    x = torch.randn(3, 1, 64, 64)
    cam = net.cam(x)
    assert cam.shape == (3, 1, 64 // TINY.stride, 64 // TINY.stride)
    assert torch.allclose(net(x), cam.mean(dim=(1, 2, 3)))


def test_spec_round_trips_through_a_dict() -> None:
    from dataclasses import asdict

    assert spec_from_dict(asdict(TINY)) == TINY
    with pytest.raises(ValueError):
        NetSpec(widths=(16, 32), blocks=(1,))


def test_augment_keeps_padding_black_and_is_seeded() -> None:
    images = torch.zeros(4, 1, 32, 32)
    masks = torch.zeros_like(images)
    masks[:, :, 8:24, :] = 1  # letterboxed: image rows 8..23 only
    images[:, :, 8:24, :] = 0.6
    no_motion = AugmentSpec(hflip=0, vflip=0, rotation_deg=0, shift=0, zoom=(1, 1))
    out = augment(images, masks, no_motion, torch.Generator().manual_seed(1))
    assert float(out[:, :, :8].abs().max()) == 0 and float(out[:, :, 24:].abs().max()) == 0
    assert float(out[:, :, 10:22].min()) > 0  # brightness/contrast moved, still inside [0, 1]
    assert float(out.max()) <= 1
    a = augment(images, masks, AugmentSpec(), torch.Generator().manual_seed(7))
    b = augment(images, masks, AugmentSpec(), torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert a.shape == images.shape


def test_export_parity_dynamic_batch_and_manifest(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = FractureNet(TINY).eval()
    spec = InputSpec(size=64)
    inputs = np.random.default_rng(0).normal(0, 1, (4, 1, 64, 64)).astype(np.float32)
    worst = export_checked(net, spec, tmp_path, inputs)
    assert worst < PARITY_TOLERANCE

    config = TrainConfig(data=tmp_path, out=tmp_path, size=64, net=TINY)
    document = {
        "name": "tiny",
        "version": "0.1",
        "input": {"size": 64, "channels": 1, "mean": config.mean, "std": config.std},
        "labels": ["no fracture", "fracture"],
        "operating_points": {
            "high_sensitivity": {"threshold": 0.2},
            "high_specificity": {"threshold": 0.8},
        },
    }
    manifest = write_manifest(tmp_path, document)
    assert manifest.sha256 == json.loads((tmp_path / "manifest.json").read_text())["onnx"]["sha256"]

    model = Model(tmp_path, intra_op_threads=1)
    for batch in (1, 3):  # the batch axis is dynamic
        probs, cams, _ = model.run(inputs[:batch])
        assert probs.shape == (batch,) and cams.shape == (batch, 2, 2)
        with torch.no_grad():
            expected = torch.sigmoid(net(torch.from_numpy(inputs[:batch]))).numpy()
        assert np.max(np.abs(probs - expected)) < PARITY_TOLERANCE


def test_parity_check_catches_a_graph_that_differs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = FractureNet(TINY).eval()
    inputs = np.random.default_rng(1).normal(0, 1, (2, 1, 64, 64)).astype(np.float32)
    export_checked(net, InputSpec(size=64), tmp_path, inputs)
    other = FractureNet(TINY).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5)
    assert parity(other, tmp_path / "model.onnx", inputs) > PARITY_TOLERANCE


def test_init_weights_must_fit_the_network(tmp_path: Path) -> None:
    net = FractureNet(TINY)
    good, bad, garbage = tmp_path / "good.pt", tmp_path / "bad.pt", tmp_path / "garbage.pt"
    torch.save({"state_dict": FractureNet(TINY).state_dict()}, good)
    torch.save({"unrelated.weight": torch.zeros(3)}, bad)
    garbage.write_bytes(b"not a torch file")
    messages: list[str] = []
    _load_init_weights(net, good, messages.append)
    assert "tensors from" in messages[0]
    with pytest.raises(ModelError, match="no tensor matches"):
        _load_init_weights(net, bad, messages.append)
    with pytest.raises(ModelError, match="cannot be read"):
        _load_init_weights(net, garbage, messages.append)


def test_train_config_checks_its_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of"):
        TrainConfig(data=tmp_path, out=tmp_path, size=100).check()
    with pytest.raises(ValueError, match="folds"):
        TrainConfig(data=tmp_path, out=tmp_path, folds=1).check()
