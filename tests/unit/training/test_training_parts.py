"""The torch side of training: network, augmentation, ONNX export with its parity check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (the 'train' extra) is not installed")

from tests.support.tiny_training import tiny_images, tiny_run  # noqa: E402
from triage_node.analysis.preprocess import InputSpec  # noqa: E402
from triage_node.analysis.runtime import ModelSession  # noqa: E402
from triage_node.errors import ModelError  # noqa: E402
from triage_node.training.augment import (  # noqa: E402
    AUGMENT_PRESETS,
    AugmentSpec,
    augment,
    localisation_loss,
)
from triage_node.training.export import (  # noqa: E402
    PARITY_TOLERANCE,
    export_checked,
    parity,
    relative_gap,
    write_manifest,
)
from triage_node.training.loop import _load_init_weights, cross_validate, fit  # noqa: E402
from triage_node.training.network import ExportWrapper, FractureNet, NetSpec, spec_from_dict  # noqa: E402
from triage_node.training.settings import TrainConfig, fingerprint, same_run  # noqa: E402

TINY = NetSpec(widths=(16, 16, 16, 16), blocks=(1, 1, 1, 1), stem=16)


def test_cam_is_exact_the_logit_is_its_mean() -> None:
    torch.manual_seed(0)
    net = FractureNet(TINY).eval()
    x = torch.randn(3, 1, 64, 64)
    cam = net.cam(x)
    assert cam.shape == (3, 1, 64 // TINY.stride, 64 // TINY.stride)
    assert torch.allclose(net(x), cam.mean(dim=(1, 2, 3)))


def test_last_stride_sets_the_cam_resolution() -> None:
    assert NetSpec().stride == 16 and NetSpec(last_stride=2).stride == 32
    x = torch.randn(1, 1, 64, 64)
    assert FractureNet(NetSpec(last_stride=2)).eval().cam(x).shape[-1] == 2
    assert FractureNet(NetSpec(last_stride=1)).eval().cam(x).shape[-1] == 4
    with pytest.raises(ValueError):
        NetSpec(last_stride=4)
    # A network of version 1 (no last_stride in its record) keeps stride 32.
    old = {
        k: v for k, v in __import__("dataclasses").asdict(NetSpec()).items() if k != "last_stride"
    }
    assert spec_from_dict(old).last_stride == 2


def test_targets_follow_the_geometric_augmentation() -> None:
    images = torch.rand(2, 1, 32, 32)
    masks = torch.ones_like(images)
    boxes = torch.zeros_like(images)
    boxes[:, :, 4:10, 2:8] = 1
    flip = AugmentSpec(hflip=1, vflip=0, rotation_deg=0, shift=0, zoom=(1, 1), brightness=0)
    out = augment(images, masks, flip, torch.Generator().manual_seed(0), targets=boxes)
    assert out.shape == (2, 2, 32, 32)
    assert torch.allclose(out[:, 1:], torch.flip(boxes, dims=[3]), atol=1e-5)
    moved = augment(images, masks, AugmentSpec(), torch.Generator().manual_seed(3), targets=boxes)
    assert 0 < float(moved[:, 1:].sum()) < 2 * 32 * 32  # still a box, somewhere


def test_localisation_loss_rewards_cam_mass_on_the_box() -> None:
    boxes = torch.zeros(2, 1, 64, 64)
    boxes[0, 0, 0:16, 0:16] = 1  # image 0: box on the top-left cell of a 4x4 CAM; image 1: none
    on_box = torch.zeros(2, 1, 4, 4)
    on_box[0, 0, 0, 0] = 5.0
    off_box = torch.zeros(2, 1, 4, 4)
    off_box[0, 0, 3, 3] = 5.0
    assert float(localisation_loss(on_box, boxes)) < 0.1 < float(localisation_loss(off_box, boxes))
    # The mean of the CAM (the image logit) does not change the loss.
    assert torch.isclose(localisation_loss(on_box + 3.0, boxes), localisation_loss(on_box, boxes))
    nothing = torch.zeros(2, 1, 64, 64)
    cam = torch.randn(2, 1, 4, 4, requires_grad=True)
    loss = localisation_loss(cam, nothing)
    loss.backward()  # type: ignore[no-untyped-call]
    assert float(loss.detach()) == 0 and cam.grad is not None and float(cam.grad.abs().max()) == 0


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


def test_the_flip_preset_only_mirrors() -> None:
    """``--augment flip``: each image comes back as itself or its left-right mirror."""
    images = torch.rand(8, 1, 16, 16)
    masks = torch.ones_like(images)
    out = augment(images, masks, AUGMENT_PRESETS["flip"], torch.Generator().manual_seed(3))
    for original, result in zip(images, out, strict=True):
        same = torch.allclose(result, original, atol=1e-5)
        mirrored = torch.allclose(result, original.flip(-1), atol=1e-5)
        assert same or mirrored
    assert set(AUGMENT_PRESETS) == {"standard", "light", "flip"}
    assert AUGMENT_PRESETS["standard"] == AugmentSpec()


def test_export_parity_dynamic_batch_and_manifest(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = FractureNet(TINY).eval()
    spec = InputSpec(size=64)
    inputs = np.random.default_rng(0).normal(0, 1, (4, 1, 64, 64)).astype(np.float32)
    worst = export_checked(ExportWrapper(net), spec, tmp_path, inputs)
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

    model = ModelSession(tmp_path, intra_op_threads=1)
    for batch in (1, 3):  # the batch axis is dynamic
        probs, cams, _ = model.run(inputs[:batch])
        cells = 64 // TINY.stride
        assert probs.shape == (batch,) and cams.shape == (batch, cells, cells)
        with torch.no_grad():
            expected = torch.sigmoid(net(torch.from_numpy(inputs[:batch]))).numpy()
        assert np.max(np.abs(probs - expected)) < PARITY_TOLERANCE


def test_parity_check_catches_a_graph_that_differs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = FractureNet(TINY).eval()
    inputs = np.random.default_rng(1).normal(0, 1, (2, 1, 64, 64)).astype(np.float32)
    export_checked(ExportWrapper(net), InputSpec(size=64), tmp_path, inputs)
    other = FractureNet(TINY).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5)
    assert parity(ExportWrapper(other), tmp_path / "model.onnx", inputs) > PARITY_TOLERANCE


def test_parity_gap_is_measured_against_each_images_own_scale() -> None:
    """A CAM cell near zero in a map that peaks at 55 carries the rounding of terms of that
    size; the probability is compared absolutely; an error as large as the map's own rounding
    times a thousand still fails."""
    cam = np.zeros((2, 1, 4, 4), np.float32)
    cam[0, 0, 0, 0], cam[1, 0, 1, 1] = 55.0, 0.5  # image 0 peaks at 55, image 1 at 0.5
    rounded = cam.copy()
    rounded[0, 0, 3, 3] += 1e-3  # a cell near zero, off by 1e-3: 1.8e-5 of the map's peak
    assert relative_gap(cam, rounded) < PARITY_TOLERANCE
    wrong = cam.copy()
    wrong[1, 0, 3, 3] += 1e-3  # the same error in a map that peaks at 0.5: absolute
    assert relative_gap(cam, wrong) > PARITY_TOLERANCE
    wrong = cam.copy()
    wrong[0, 0, 3, 3] += 1.0  # a real difference in the large map
    assert relative_gap(cam, wrong) > PARITY_TOLERANCE
    probability = np.array([[0.2], [0.9]], np.float32)
    assert relative_gap(probability, probability + np.float32(2e-4)) > PARITY_TOLERANCE
    ood = np.array([[300.0], [1.5]], np.float32)
    assert relative_gap(ood, ood + np.array([[1e-2], [0.0]], np.float32)) < PARITY_TOLERANCE


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


def test_resume_continues_exactly_where_the_run_stopped(tmp_path: Path) -> None:
    """Three epochs in one go, and one epoch then --resume to three: the same network."""
    base = tiny_run(tmp_path, epochs=3, box_loss=0.5)
    train, validation = tiny_images(32, 0), tiny_images(16, 1)
    torch.set_num_threads(1)
    straight, best = fit(train, validation, base, lambda _: None, None, tmp_path / "a.pt")

    messages: list[str] = []
    first = __import__("dataclasses").replace(base, epochs=1)
    fit(train, validation, first, messages.append, None, tmp_path / "b.pt")
    resumed, best_b = fit(train, validation, base, messages.append, None, tmp_path / "b.pt")
    assert any("resuming after epoch 1" in m for m in messages)
    assert best_b == best
    assert len(best["validation_auroc_by_epoch"]) == 3  # the curve spans the resume too
    for (name, a), (_, b) in zip(
        straight.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name

    other = __import__("dataclasses").replace(base, learning_rate=0.5)
    with pytest.raises(ModelError, match="other settings"):
        fit(train, validation, other, messages.append, None, tmp_path / "b.pt")


def test_select_last_keeps_the_last_epoch_and_never_stops_early(tmp_path: Path) -> None:
    # a high rate makes validation AUROC move about; patience 1 would stop a "best" run early
    config = tiny_run(tmp_path, epochs=4, patience=1, learning_rate=0.05, select="last")
    torch.set_num_threads(1)
    _, best = fit(tiny_images(32, 0), tiny_images(16, 1), config, lambda _: None, None)
    assert best["epoch"] == 4
    assert best["auroc"] == pytest.approx(best["validation_auroc_by_epoch"][-1], abs=1e-4)
    with pytest.raises(ValueError, match="--select must be one of"):
        TrainConfig(data=tmp_path, out=tmp_path, select="median").check()


def test_a_setting_added_later_matches_an_older_checkpoint_at_its_default(tmp_path: Path) -> None:
    config = TrainConfig(data=tmp_path, out=tmp_path)
    older = {k: v for k, v in fingerprint(config).items() if k != "select"}
    assert same_run(older, config)
    assert not same_run(older, __import__("dataclasses").replace(config, select="last"))


def test_the_data_folder_counts_as_one_whichever_way_it_is_spelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run started with ``../shared/data/x`` resumes when given ``/work/shared/data/x``, and a
    checkpoint that recorded the relative spelling still fits, read from the same directory."""
    (tmp_path / "data").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    relative = TrainConfig(data=Path("../data"), out=tmp_path)
    absolute = TrainConfig(data=tmp_path / "data", out=tmp_path)
    assert fingerprint(relative) == fingerprint(absolute)
    older = {**fingerprint(absolute), "data": "../data"}  # as written before paths were resolved
    assert same_run(older, absolute)
    assert not same_run({**older, "data": "../elsewhere"}, absolute)


def test_cross_validation_record_of_other_settings_is_refused_not_overwritten(
    tmp_path: Path,
) -> None:
    config = TrainConfig(data=tmp_path, out=tmp_path, folds=2, size=32)
    record = tmp_path / "cross-validation.json"
    other = {**fingerprint(config), "learning_rate": 0.5}
    text = json.dumps({"fingerprint": other, "folds": {"1": {"auroc": 0.9}}})
    record.write_text(text)
    with pytest.raises(ModelError, match="other settings"):
        cross_validate([], tiny_images(4, 0), config, lambda _: None, tmp_path)
    assert record.read_text() == text


def test_refit_trains_without_validation_and_keeps_the_last_epoch(tmp_path: Path) -> None:
    """``--refit``: nothing held out, exactly ``epochs`` trained, the last kept, resumable."""
    config = tiny_run(tmp_path, epochs=3, patience=1, folds=2, refit=True)
    config.check()
    torch.set_num_threads(1)
    messages: list[str] = []
    log = tmp_path / "log.jsonl"
    net, best = fit(tiny_images(32, 0), None, config, messages.append, log, tmp_path / "s.pt")
    assert best["epoch"] == 3 and best["validation_auroc_by_epoch"] == []
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all("validation_auroc" not in r for r in records)
    again, _ = fit(tiny_images(32, 0), None, config, messages.append, None, tmp_path / "s.pt")
    assert any("resuming after epoch 3" in m for m in messages)
    assert all(
        torch.equal(a, b)
        for a, b in zip(net.state_dict().values(), again.state_dict().values(), strict=True)
    )
    with pytest.raises(ValueError, match="--refit needs --folds"):
        TrainConfig(data=tmp_path, out=tmp_path, refit=True).check()


def test_a_refit_reads_the_cross_validation_record_made_without_it(tmp_path: Path) -> None:
    """The folds are the same whether or not the final network is refitted: a record written
    by a plain ``--folds`` run is read, not refused, by a ``--refit`` run of the same recipe."""
    plain = TrainConfig(data=tmp_path, out=tmp_path, folds=2, size=32)
    record = tmp_path / "cross-validation.json"
    done = {str(k): {"auroc": a, "cam_peak_within_16px": None} for k, a in ((1, 0.9), (2, 0.8))}
    text = json.dumps({"fingerprint": fingerprint(plain), "folds": done})
    record.write_text(text)
    refit = __import__("dataclasses").replace(plain, refit=True)
    summary = cross_validate([], tiny_images(4, 0), refit, lambda _: None, tmp_path)
    assert summary["auroc"] == [0.9, 0.8]
    assert record.read_text() == text
