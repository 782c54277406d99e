"""The test files share code only through tests/helpers.py and conftest.py fixtures: no test
file imports from another test file, and local modules are imported one way (``tests.NAME``)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
LOCAL = {p.stem for p in TESTS.glob("*.py")}


def _local_imports(path: Path) -> list[str]:
    """The tests/ modules a file imports, as written (``test_x``, ``tests.helpers``, ``.x``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            # ``from tests import x`` and ``from . import x`` name modules in their aliases
            sep = "" if base.endswith(".") else "."
            names = [base + sep + a.name for a in node.names] if base in ("tests", ".") \
                else [base]
        else:
            continue
        found += [n for n in names
                  if n.lstrip(".").split(".")[0] in LOCAL | {"tests"} or n.startswith(".")]
    return found


def _violations(path: Path) -> list[str]:
    bad = []
    for name in _local_imports(path):
        stem = name.lstrip(".").split(".")[-1]
        if stem.startswith("test_"):
            bad.append(f"{path.name} imports the test module '{name}'")
        elif not name.startswith("tests."):
            bad.append(f"{path.name} imports '{name}': write 'tests.{stem}'")
    return bad


def test_no_test_file_imports_another():
    bad = [v for p in sorted(TESTS.glob("*.py")) for v in _violations(p)]
    assert not bad, "\n".join(bad)


def test_the_check_sees_a_violation(tmp_path):
    bad = tmp_path / "test_bad.py"
    bad.write_text("from test_methods import x\nimport tests.test_cli\nfrom tests import "
                   "test_zoo\nfrom . import test_qdq\nfrom helpers import run\n"
                   "from tests.helpers import cli\nimport numpy\n")
    assert _violations(bad) == [
        "test_bad.py imports the test module 'test_methods'",
        "test_bad.py imports the test module 'tests.test_cli'",
        "test_bad.py imports the test module 'tests.test_zoo'",
        "test_bad.py imports the test module '.test_qdq'",
        "test_bad.py imports 'helpers': write 'tests.helpers'",
    ]
