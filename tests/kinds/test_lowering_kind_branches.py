"""lowering/ and planner/prune/ never branch on a block kind's name: no comparison or membership
test against a kind's literal name, no literal lookup such as ``model.block("moe")`` or
``spec.count("mamba")``. What is specific to a kind lives in its package (plait/kinds/<kind>/) and
is reached through the registry (the counter of /work/tools/kind_branches.py, as a test)."""
import ast
from pathlib import Path

from plait.ir import kinds

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("lowering", "planner/prune")
# Sites still to move, with their counts: HF checkpoint names are the hf facet's (issue #16); the
# count may only go down (update it when a site moves).
REMAINING = {"lowering/weight_names.py": 5}


def _names_a_kind(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in kinds.names()
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_names_a_kind(e) for e in node.elts)
    return False


def kind_branches(source: str) -> list[int]:
    """Line numbers of kind-name comparisons and literal kind lookups in ``source``."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(_names_a_kind(n) for n in (node.left, *node.comparators)):
            lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("block", "count") and node.args and _names_a_kind(node.args[0]):
            lines.append(node.lineno)
    return sorted(lines)


def test_the_counter_finds_each_form_of_branch():
    source = '''
if kind == "moe": pass
if "mamba" in spec.layers: pass
if layer.kind not in ("attention", "mlp"): pass
heads = model.block("attention").heads
n = spec.count("mlp")
if kind == other: pass
x = {"moe": 1}["moe"]
'''
    assert kind_branches(source) == [2, 3, 4, 5, 6]


def test_lowering_and_the_pruning_planner_name_no_kind():
    found = {}
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            lines = kind_branches(path.read_text())
            if lines:
                found[str(path.relative_to(ROOT))] = lines
    counts = {name: len(lines) for name, lines in found.items()}
    assert counts == REMAINING, {name: found.get(name) for name in set(counts) | set(REMAINING)}
