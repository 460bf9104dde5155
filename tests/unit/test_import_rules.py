"""Imports flow one way along the data path (docs/architecture.md): each third-party library
with a job has one subpackage that imports it, and the run-time subpackages never reach into
the database, the service or the training toolchain.

An import under ``if TYPE_CHECKING:`` is for annotations only and does not count; an import
inside a function does (it runs when the function does).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "triage_node"

FOUNDATION = {"errors", "domain", "logs", "config", "spool", "credentials", "networks"}
SUBPACKAGES = {
    "dicom",
    "dicomweb",
    "hl7",
    "db",
    "analysis",
    "results",
    "service",
    "ops",
    "training",
    "web",
}

# library -> the only subpackage (or top-level module) that may import it
OWNERS = {
    "pynetdicom": {"dicom"},
    "cheroot": {"dicomweb"},
    "python_multipart": {"dicomweb"},
    "dicomweb_client": {"dicomweb"},
    "requests": {"dicomweb"},
    "highdicom": {"results"},
    "sqlalchemy": {"db"},
    "alembic": {"db"},
    "torch": {"training"},
    "onnxruntime": {"analysis", "training"},
    "apscheduler": {"service"},
    "prometheus_client": {"ops"},
    "starlette": {"web"},
    "uvicorn": {"web"},
    "jinja2": {"web"},
    "argon2": {"web"},
}

# part -> triage_node parts it must never import at run time
FORBIDDEN = {
    **{name: SUBPACKAGES | {"cli"} for name in FOUNDATION},
    "hl7": SUBPACKAGES - {"hl7"} | {"cli"},
    "dicom": {"db", "service", "ops", "training", "analysis", "results", "hl7", "cli", "dicomweb"}
    | {"web"},
    "dicomweb": {"db", "service", "ops", "training", "analysis", "results", "hl7", "cli", "web"},
    "db": SUBPACKAGES - {"db"} | {"cli"},
    "analysis": {"db", "service", "ops", "training", "dicom", "dicomweb", "results", "hl7", "cli"}
    | {"web"},
    "results": {"db", "service", "ops", "training", "dicom", "dicomweb", "hl7", "cli", "web"},
    "ops": {"service", "training", "cli", "web"},
    "service": {"training", "cli"},
    "training": {"db", "service", "ops", "dicom", "dicomweb", "hl7", "results", "cli", "web"},
    # the web interface reads the database, the status report and the spool; it never reaches
    # into the data path's network code or the service that runs it
    "web": {"service", "training", "cli", "dicom", "dicomweb", "hl7", "results"},
}
# nothing outside training/ and the CLI imports training/
for part, forbidden in FORBIDDEN.items():
    if part != "training":
        forbidden.add("training")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted below triage_node
    target: str  # what it imports, fully dotted
    line: int


def part_of(dotted: str) -> str:
    """The subpackage or top-level module a module below triage_node belongs to."""
    return dotted.split(".")[0]


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node, less the bodies of ``if TYPE_CHECKING:`` blocks."""
    found: list[ast.AST] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        found.append(node)
        if isinstance(node, ast.If) and ast.unparse(node.test) in (
            "TYPE_CHECKING",
            "typing.TYPE_CHECKING",
        ):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


def runtime_imports(src: Path = SRC) -> list[Import]:
    imports: list[Import] = []
    for path in sorted(src.rglob("*.py")):
        relative = path.relative_to(src).with_suffix("")
        if relative.parts[:2] == ("db", "migrations"):
            continue  # Alembic's revision files use SQLAlchemy by design and live in db/
        module = ".".join(p for p in relative.parts if p != "__init__") or "__init__"
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imports += [Import(module, a.name, node.lineno) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "triage_node":
                    targets = [f"triage_node.{a.name}" for a in node.names]
                else:
                    targets = [node.module]
                imports += [Import(module, t, node.lineno) for t in targets]
    return imports


def violations(imports: list[Import]) -> list[str]:
    found = []
    for imp in imports:
        part = part_of(imp.module)
        library = imp.target.split(".")[0]
        if library in OWNERS and part not in OWNERS[library]:
            found.append(f"{imp.module}:{imp.line} imports {imp.target} (only {OWNERS[library]})")
        if library == "triage_node" and "." in imp.target:
            target_part = imp.target.split(".")[1]
            if target_part in FORBIDDEN.get(part, set()):
                found.append(f"{imp.module}:{imp.line} imports {imp.target}")
    return found


def test_the_rules_hold() -> None:
    assert violations(runtime_imports()) == []


def test_every_module_belongs_to_a_known_part() -> None:
    parts = {part_of(i.module) for i in runtime_imports()}
    assert parts <= FOUNDATION | SUBPACKAGES | {"cli", "__init__", "__main__"}, parts


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("analysis/pipeline.py", "from triage_node.db.queue import JobQueue\n", "db.queue"),
        ("analysis/runtime.py", "import torch\n", "torch"),
        ("dicom/storage_scp.py", "def f():\n    import triage_node.service.worker\n", "service"),
        ("ops/status.py", "from pynetdicom import AE\n", "pynetdicom"),
        ("domain.py", "from triage_node import db\n", "triage_node.db"),
    ],
)
def test_a_broken_rule_is_caught(tmp_path: Path, module: str, source: str, expected: str) -> None:
    path = tmp_path / module
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source, encoding="utf-8")
    found = violations(runtime_imports(tmp_path))
    assert len(found) == 1 and expected in found[0], found


def test_annotations_only_imports_do_not_count(tmp_path: Path) -> None:
    (tmp_path / "dicom").mkdir()
    (tmp_path / "dicom" / "storage_scp.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from triage_node.db.intake import Intake\n",
        encoding="utf-8",
    )
    assert violations(runtime_imports(tmp_path)) == []
