"""Measure the scope guard on the pooled features of earlier blocks against the last features.

The bundled guard (``training/ood.py``) is the Mahalanobis distance of the pooled 1,280 last
features. This fits the same guard on the pooled output of several EfficientNet-Lite blocks of
a trained model (on the training split), sets each one's threshold at the highest validation
score (as ``triage-node train`` does), and prints for each layer the test split's pass count and,
for every decodable file in the shared DICOM samples, its score divided by that threshold
(above 1: stopped). The DICOM files go through the node's own preprocessing with the model's
manifest input. With ``--save FILE.npz`` every layer's features are kept for other guards
(``scripts/guard_knn.py``). Nothing here is used at run time; the figures are in the model card.

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
TOP = "top (bundled)"  # the pooled last features, what the bundled guard uses


def block_outputs(net: Any) -> dict[str, list[np.ndarray]]:
    """Hooks on :data:`BLOCKS` that keep each block's pooled output of every forward pass (the
    network's own ``features()``, run by ``score_images`` or directly)."""
    kept: dict[str, list[np.ndarray]] = {f"block {index}": [] for index in BLOCKS}

    def keep(name: str) -> Any:
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            kept[name].append(output.mean(dim=(2, 3)).numpy())

        return hook

    for index in BLOCKS:
        net.blocks[index].register_forward_hook(keep(f"block {index}"))
    return kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--dicom", type=Path, required=True)
    parser.add_argument("--arguments", required=True, help="the model's training arguments")
    parser.add_argument(
        "--save", type=Path, help="also write every layer's pooled features to this .npz"
    )
    args = parser.parse_args()

    import torch
    from pydicom import dcmread

    from triage_node.analysis.manifest import load_manifest
    from triage_node.analysis.preprocess import preprocess
    from triage_node.training.finalise import read_training_images, split_folder
    from triage_node.training.images import Images, build_net, load_images, score_images
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

    kept = block_outputs(net)

    def features(images: Images) -> dict[str, np.ndarray]:
        for parts in kept.values():
            parts.clear()
        last = score_images(net, images, config).features
        return {**{k: np.concatenate(v) for k, v in kept.items()}, TOP: last}

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
        for parts in kept.values():
            parts.clear()
        with torch.no_grad():
            last = net.features(torch.from_numpy(tensor[None])).mean(dim=(2, 3)).numpy()
        dicom.append((label, {**{k: v[0] for k, v in kept.items()}, TOP: last}))

    if args.save:
        names = {layer: layer.split(" (")[0].replace(" ", "_") for layer in train}
        np.savez_compressed(
            args.save,
            dicom_labels=np.array([label for label, _ in dicom]),
            **{
                f"{part}_{names[layer]}": features[layer]
                for part, features in (("train", train), ("validation", validation), ("test", test))
                for layer in train
            },
            **{
                f"dicom_{names[layer]}": np.concatenate([f[layer] for _, f in dicom])
                for layer in train
            },
        )
        print(f"features written to {args.save}")
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
