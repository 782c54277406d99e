"""The package imports only downward (see docs/architecture.md): no cycle, no upward import.

Imports under ``if TYPE_CHECKING:`` are annotations only and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "onnx_udfc"
# Lowest first. A module may import from its own layer and any layer below it.
LAYERS = ["core", "config", "ops", "moments", "channels", "quant", "methods", "report",
          "pipeline", "api", "cli"]
TOP = {"__init__": 0, "__main__": len(LAYERS) - 1}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 0  # the package itself: only __version__ and UdfcError, both from core
    head = parts[1]
    if head in TOP:
        return TOP[head]
    return LAYERS.index(head)


def _runtime_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "onnx_udfc":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if (PACKAGE.parent / full.replace(".", "/")).with_suffix(
                    ".py").exists() or (PACKAGE.parent / full.replace(".", "/")).is_dir()
                    else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "onnx_udfc")
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _runtime_imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer():
    for module in _graph():
        assert _layer(module) >= 0, module


def test_no_upward_import():
    upward = [f"{m} (layer {LAYERS[_layer(m)]}) imports {d} (layer {LAYERS[_layer(d)]})"
              for m, deps in _graph().items() for d in deps
              if m != "onnx_udfc" and _layer(d) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d not in graph or d == m:
                continue
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)


def test_the_check_sees_a_violation(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("from onnx_udfc.api import compress\nif TYPE_CHECKING:\n"
                   "    from onnx_udfc.cli import main\n")
    assert _runtime_imports(bad) == {"onnx_udfc.api"}
