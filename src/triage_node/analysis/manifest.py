"""The model is data: ``models/<name>/manifest.json`` beside ``model.onnx``.

The manifest says what the network expects and what its outputs mean; :func:`load_manifest`
checks every field (naming the bad one) and the ONNX file's SHA-256, so a swapped or damaged
file is refused before it is used.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from triage_node.analysis.preprocess import InputSpec
from triage_node.analysis.scope import Scope, scope_from_document
from triage_node.domain import OPERATING_POINT_ORDER, OperatingPointName
from triage_node.errors import ModelError

MANIFEST = "manifest.json"


@dataclass(frozen=True, slots=True)
class OperatingPoint:
    name: str
    threshold: float
    sensitivity: float | None = None
    specificity: float | None = None


@dataclass(frozen=True, slots=True)
class Selection:
    """Which instances the model is for; empty lists allow any value."""

    modalities: tuple[str, ...] = ("CR", "DX", "DR")
    sop_classes: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    views: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Manifest:
    directory: Path
    name: str
    version: str
    onnx_file: str
    sha256: str
    input_name: str
    probability_output: str
    cam_output: str
    input: InputSpec
    labels: tuple[str, ...]
    operating_points: dict[OperatingPointName, OperatingPoint]
    selection: Selection
    scope: Scope = field(default_factory=Scope)
    ood_output: str | None = None  # the graph's out-of-distribution score, if it has one ...
    ood_threshold: float | None = None  # ... and the score above which an image is refused
    calibration: dict[str, Any] = field(default_factory=dict)  # how probabilities were calibrated
    training_data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def onnx_path(self) -> Path:
        return self.directory / self.onnx_file


class _Reader:
    """Typed access to the JSON document with errors that name the field."""

    def __init__(self, document: Any, path: Path) -> None:
        self.document = document
        self.path = path

    def fail(self, key: str, problem: str) -> ModelError:
        return ModelError(f"{self.path}: {key}: {problem}")

    def get(self, key: str, default: Any = ...) -> Any:
        node = self.document
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                if default is ...:
                    raise self.fail(key, "missing")
                return default
            node = node[part]
        return node

    def text(self, key: str, default: Any = ...) -> str:
        value = self.get(key, default)
        if not isinstance(value, str) or not value:
            raise self.fail(key, "must be a non-empty string")
        return value

    def number(self, key: str, low: float, high: float, default: Any = ...) -> float:
        value = self.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise self.fail(key, f"must be a number from {low} to {high}, got {value!r}")
        return float(value)

    def optional_number(self, key: str, low: float, high: float) -> float | None:
        return None if self.get(key, None) is None else self.number(key, low, high)

    def strings(self, key: str, default: Any = ...) -> tuple[str, ...]:
        value = self.get(key, default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, "must be a list of strings")
        return tuple(value)

    def choice(self, key: str, options: tuple[str, ...], default: Any = ...) -> str:
        value = self.get(key, default)
        if value not in options:
            raise self.fail(key, f"must be one of {', '.join(options)}, got {value!r}")
        return str(value)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(directory: Path, *, verify: bool = True) -> Manifest:
    """Read and check ``directory/manifest.json`` (and the ONNX file's SHA-256)."""
    path = directory / MANIFEST
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path} does not exist (is {directory} a model directory?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} cannot be read: {exc}") from None
    r = _Reader(document, path)

    size = r.number("input.size", 16, 4096)
    if size != int(size):
        raise r.fail("input.size", "must be a whole number")
    spec = InputSpec(
        size=int(size),
        channels=int(r.number("input.channels", 1, 3, 1)),
        mean=r.number("input.mean", -1e6, 1e6, 0.5),
        std=r.number("input.std", 1e-9, 1e6, 0.25),
        resize=r.choice("input.resize", ("letterbox", "stretch"), "letterbox"),  # type: ignore[arg-type]
        windowing=r.choice("input.windowing", ("header", "percentile"), "header"),  # type: ignore[arg-type]
    )
    points = {}
    for name in OPERATING_POINT_ORDER:
        key = f"operating_points.{name}"
        points[name] = OperatingPoint(
            name=name,
            threshold=r.number(f"{key}.threshold", 0, 1),
            sensitivity=r.optional_number(f"{key}.sensitivity", 0, 1),
            specificity=r.optional_number(f"{key}.specificity", 0, 1),
        )
    sha = r.text("onnx.sha256").lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise r.fail("onnx.sha256", "must be 64 hexadecimal digits")
    onnx_file = r.text("onnx.file", "model.onnx")
    if Path(onnx_file).name != onnx_file:
        raise r.fail("onnx.file", "must be a file name inside the model directory")
    labels = r.strings("labels")
    if len(labels) != 2:
        raise r.fail("labels", "must name the negative and the positive class")
    try:
        scope = scope_from_document(r.get("scope", None))
    except ValueError as exc:
        raise r.fail("scope", str(exc)) from None
    ood_output = r.get("onnx.outputs.ood_score", None)
    if ood_output is not None and (not isinstance(ood_output, str) or not ood_output):
        raise r.fail("onnx.outputs.ood_score", "must be a non-empty string")
    ood_threshold = r.optional_number("ood.threshold", 0, 1e12)
    if (ood_output is None) != (ood_threshold is None):
        raise r.fail("ood.threshold", "goes with onnx.outputs.ood_score (both or neither)")
    manifest = Manifest(
        directory=directory,
        name=r.text("name"),
        version=r.text("version"),
        onnx_file=onnx_file,
        sha256=sha,
        input_name=r.text("onnx.input", "image"),
        probability_output=r.text("onnx.outputs.probability", "probability"),
        cam_output=r.text("onnx.outputs.cam", "cam"),
        input=spec,
        labels=labels,
        operating_points=points,
        selection=Selection(
            modalities=r.strings("selection.modalities", ["CR", "DX", "DR"]),
            sop_classes=r.strings("selection.sop_classes", []),
            body_parts=tuple(p.upper() for p in r.strings("selection.body_parts", [])),
            views=tuple(v.upper() for v in r.strings("selection.views", [])),
        ),
        scope=scope,
        ood_output=ood_output,
        ood_threshold=ood_threshold,
        calibration=dict(r.get("calibration", {}) or {}),
        training_data=dict(r.get("training_data", {}) or {}),
        metrics=dict(r.get("metrics", {}) or {}),
    )
    if verify:
        if not manifest.onnx_path.is_file():
            raise ModelError(f"{manifest.onnx_path} does not exist")
        actual = sha256_of(manifest.onnx_path)
        if actual != manifest.sha256:
            raise ModelError(
                f"{manifest.onnx_path}: SHA-256 {actual} does not match the manifest's "
                f"{manifest.sha256}; refusing to load a model that is not the one described"
            )
    return manifest
