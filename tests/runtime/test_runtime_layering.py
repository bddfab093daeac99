"""The runtime's rooms, read from its source: the training core (runtime/*.py) imports neither
distillation (runtime/distill/) nor the test harnesses (runtime/harness/), distillation does not
import the harnesses, and no runtime module imports another module's private (_underscore) names."""
import ast
from pathlib import Path

import pytest

RUNTIME = Path(__file__).resolve().parents[2] / "runtime"


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, as a dotted name relative to runtime/ where it is relative
    ("..harness.parity" from runtime/distill/x.py -> "harness.parity")."""
    package = path.parent.relative_to(RUNTIME).parts
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1]
            if node.module:
                out.add(".".join((*base, node.module)))
            else:  # from .. import checkpoint
                out.update(".".join((*base, alias.name)) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("plait.runtime."):
            out.add(node.module.removeprefix("plait.runtime."))
    return out


def private_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [f"{path.relative_to(RUNTIME)}:{node.lineno} {alias.name}"
            for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and not (node.module or "").startswith(("torch", "__future__"))
            for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]


def test_imported_modules_resolves_relative_imports(tmp_path):
    assert imported_modules(RUNTIME / "distill" / "launch.py") >= {"checkpoint", "distill.parallel"}


@pytest.mark.parametrize("path", sorted(RUNTIME.glob("*.py")), ids=lambda p: p.name)
def test_the_training_core_imports_neither_distillation_nor_the_harnesses(path):
    wrong = {m for m in imported_modules(path) if m.split(".")[0] in ("distill", "harness")}
    assert not wrong, f"runtime/{path.name} imports {sorted(wrong)}"


def test_distillation_does_not_import_the_harnesses():
    for path in (RUNTIME / "distill").glob("*.py"):
        assert not {m for m in imported_modules(path) if m.startswith("harness")}, path.name


def test_no_runtime_module_imports_a_private_name():
    assert [p for path in sorted(RUNTIME.rglob("*.py")) for p in private_imports(path)] == []
