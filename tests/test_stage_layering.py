"""Data flows one way, dsl -> ir -> planner -> lowering -> runtime: read from the source, no stage
imports a later one, nor the front door (plait.commands, plait.cli, plait.api, plait.pruning).
The kinds' facets are loaded by name through ir.kinds (each facet's own imports are the kinds'
rules, tests/kinds), so they are not a stage here."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("ir", "planner", "lowering", "runtime")
FRONT_DOOR = ("commands", "cli", "api", "pruning")


def plait_imports(path: Path) -> list[tuple[int, str]]:
    """(line, second name) of every absolute ``plait.<name>`` import in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        out += [(node.lineno, n.split(".")[1]) for n in names
                if n.startswith("plait.") and n.count(".") >= 1]
    return out


def test_plait_imports_reads_both_import_forms(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("import plait.runtime.mesh\nfrom plait.ir.plan import Layout\nfrom . import y\n")
    assert plait_imports(source) == [(1, "runtime"), (2, "ir")]


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_imports_a_later_stage_or_the_front_door(stage):
    later = set(STAGES[STAGES.index(stage) + 1:]) | set(FRONT_DOOR)
    wrong = [f"{path.relative_to(ROOT)}:{line} plait.{name}"
             for path in sorted((ROOT / stage).rglob("*.py"))
             for line, name in plait_imports(path) if name in later]
    assert wrong == []
