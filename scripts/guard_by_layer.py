"""Measure the scope guard on the pooled features of earlier blocks against the last features.

The bundled guard (``training/ood.py``) is the Mahalanobis distance of the pooled 1,280 last
features. This fits the same guard on the pooled output of several EfficientNet-Lite blocks of
a trained model (on the training split), sets each one's threshold at the highest validation
score (as ``triage-node train`` does), and prints for each layer the test split's pass count and,
for every decodable file in the shared DICOM samples, its score divided by that threshold
(above 1: stopped). The DICOM files go through the node's own preprocessing with the model's
manifest input. Nothing here is used at run time; the figures are in the model card.

    .venv/bin/python scripts/guard_by_layer.py --model models/fracture-v4 \\
        --data ../shared/data/fracatlas --dicom ../shared/data/dicom \\
        --arguments "--backbone efficientnet-lite0 --size 384 ..."

The arguments must be the ones the model was trained with (its manifest's recipe), as for
``scripts/state_from_model.py``. About 10 minutes on 2 CPU cores (the features of 3,477 images).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from train_sweep import recipe_config

BLOCKS = (5, 7, 10, 12, 15)  # of Lite0's 16 (from 0): 80, 80, 112, 192 and 320 channels


def pooled_by_layer(net: Any, x: Any) -> dict[str, np.ndarray]:
    """Global-average-pooled outputs of :data:`BLOCKS` and of the top convolution."""
    import torch

    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        h = net.stem(x)
        for index, block in enumerate(net.blocks):
            h = block(h, drop_connect_rate=None)
            if index in BLOCKS:
                out[f"block {index}"] = h.mean(dim=(2, 3)).numpy()
        out["top (bundled)"] = net.top(h).mean(dim=(2, 3)).numpy()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--dicom", type=Path, required=True)
    parser.add_argument("--arguments", required=True, help="the model's training arguments")
    args = parser.parse_args()

    import torch
    from pydicom import dcmread

    from triage_node.analysis.manifest import load_manifest
    from triage_node.analysis.preprocess import preprocess
    from triage_node.training.finalise import read_training_images, split_folder
    from triage_node.training.images import Images, build_net, load_images, normalise
    from triage_node.training.ood import fit_whitening

    config = recipe_config(args.data, args.model, args.arguments)
    torch.set_num_threads(config.threads or 2)
    splits = split_folder(config, print)
    _, _, train_images, validation_images = read_training_images(splits, config, print)
    test_images = load_images(splits["test"], config.size, print)
    net = build_net(config, pretrained=False)
    checkpoint = torch.load(args.model / "checkpoint.pt", map_location="cpu", weights_only=False)
    net.load_state_dict(checkpoint["state_dict"])
    net.eval()

    def features(images: Images) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(images), 64):
            pixels, _, _ = images.batch(torch.arange(start, min(start + 64, len(images))))
            for layer, value in pooled_by_layer(net, normalise(pixels, config)).items():
                parts.setdefault(layer, []).append(value)
        return {layer: np.concatenate(values) for layer, values in parts.items()}

    train, validation, test = (features(i) for i in (train_images, validation_images, test_images))
    spec = load_manifest(args.model).input
    dicom: list[tuple[str, dict[str, np.ndarray]]] = []
    for path in sorted(p for p in args.dicom.rglob("*.dcm") if p.is_file()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = dcmread(path)
                tensor = preprocess(ds, spec).tensor
        except Exception as exc:  # unreadable or refused: the node never scores it either
            print(f"{path.name}: not scored ({type(exc).__name__})")
            continue
        label = f"{path.name[:32]} {ds.get('Modality', '')} {ds.get('BodyPartExamined', '')}"
        dicom.append((label, pooled_by_layer(net, torch.from_numpy(tensor[None]))))

    ratios: dict[str, list[float]] = {}
    for layer in train:
        whitening = fit_whitening(train[layer])
        threshold = float(whitening.score(validation[layer]).max())
        passed = int((whitening.score(test[layer]) <= threshold).sum())
        dims = train[layer].shape[1]
        print(f"{layer:15s} {dims:5d} features: test {passed}/{len(test[layer])} pass")
        ratios[layer] = [float(whitening.score(f[layer])[0]) / threshold for _, f in dicom]
    print("score / threshold (above 1: stopped)".ljust(50) + "".join(f"{k:>15s}" for k in ratios))
    for row, (label, _) in enumerate(dicom):
        print(label.ljust(50) + "".join(f"{ratios[k][row]:15.2f}" for k in ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
