"""The house stays acyclic: each layer imports only the layers below it (checked from the source)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """Absolute module names ``path`` imports (relative imports resolved), at any depth of the file."""
    return _imports_of(path.read_text(), ".".join(path.relative_to(ROOT).parts[:-1]))


def _imports_of(source: str, package: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "operators":
        return "kernels" if parts[1:2] == ["kernels"] else "operators"
    if parts[0] == "tda_graph":
        if parts[1:2] in (["workflows"], ["frontends"]):
            return parts[1]
        return "core" if parts[1:2] != ["models"] else "models"
    return None


# what each layer may import (besides itself and third-party packages)
ALLOWED = {
    "core": {"core"},
    "kernels": {"kernels"},
    "operators": {"operators", "kernels", "core"},
    "models": {"models", "core"},
    "workflows": {"workflows", "operators", "kernels", "core", "models"},
    "frontends": {"frontends", "workflows", "operators", "kernels", "core", "models"},
}

FILES = sorted(p for d in ("tda_graph", "operators") for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_imports_only_lower_layers(path: Path) -> None:
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    own = _layer(module)
    bad = sorted(m for m in _imports(path) if _layer(m) is not None and _layer(m) not in ALLOWED[own])
    assert not bad, f"{module} ({own}) imports {bad}; allowed layers: {sorted(ALLOWED[own])}"


def test_the_checker_sees_violations() -> None:
    # guard against a checker that passes everything: the wrinkle this test was written for,
    # a workflow importing a frontend helper, and a kernel importing the engine
    wf = _imports_of("from tda_graph.frontends.atomic import atomic_path\n", "tda_graph.workflows")
    assert {_layer(m) for m in wf} == {"frontends"} and "frontends" not in ALLOWED["workflows"]
    rel = _imports_of("from ...tda_graph import Roi\nfrom . import forest_cpu\n", "operators.kernels")
    assert "operators.kernels.forest_cpu" in rel
    k = _imports_of("import numpy as np\nfrom tda_graph.roi import Roi\n", "operators.kernels")
    assert "core" in {_layer(m) for m in k} and "core" not in ALLOWED["kernels"]
    assert "operators" not in ALLOWED["core"]
