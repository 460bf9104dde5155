"""Imports flow one way along the data path (architecture.md)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "triage_node"

# Lower number = lower layer. A module may import only modules of a lower layer.
LAYERS = {
    "cli": 10,
    "service": 9,
    "exporter": 8,
    "health": 7,
    "reconcile": 4,
    "escalate": 4,
    "retention": 4,
    "query": 3,
    "hl7": 1,
    "mllp": 1,
    "worker": 7,
    "files": 7,
    "scheduler": 7,
    "pipeline": 6,
    "training": 7,
    "finalise": 8,
    "trainconfig": 4,
    "trainimages": 5,
    "backbone": 1,
    "calibration": 1,
    "ood": 1,
    "scope": 1,
    "allocator": 0,
    "evaluate": 6,
    "onnxexport": 5,
    "imagefile": 4,
    "net": 2,
    "augment": 1,
    "plot": 1,
    "render": 4,
    "results": 6,
    "outbox": 6,
    "deliver": 2,
    "report": 4,
    "receive": 4,
    "infer": 5,
    "model": 4,
    "preprocess": 3,
    "gdcmdecode": 1,
    "metrics": 1,
    "dataset": 1,
    "store": 3,
    "spool": 3,
    "db": 2,
    "config": 2,
    "errors": 0,
    "domain": 1,
    "logs": 0,
}


def test_every_module_has_a_layer() -> None:
    modules = {p.stem for p in SRC.glob("*.py")} - {"__init__", "__main__"}
    assert modules <= set(LAYERS), modules - set(LAYERS)


def test_imports_point_down() -> None:
    for path in SRC.glob("*.py"):
        if path.stem in ("__init__", "__main__"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("triage_node.")
            ):
                target = node.module.split(".")[1]
                assert LAYERS[target] < LAYERS[path.stem], f"{path.stem} imports {target}"
