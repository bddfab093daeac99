"""The ir-level core never branches on a block kind's name (issue #16): no comparison or membership
test against a kind's literal name, and no literal lookup such as ``model.block("moe")`` or
``model.count("mamba")``, in ir/ (the family importers included) or in the ir-level files outside
it that map kinds (lowering/weight_names.py, plait/commands/spec.py and megatron.py). What is
specific to a kind lives in its package, plait/kinds/<kind>/, and is reached through the registry.
The scanner is the AST rule of tools/kind_branches.py, with the kind names taken from the registry."""
import ast
from pathlib import Path

from plait.ir import kinds

ROOT = Path(__file__).resolve().parents[2]
CORE = sorted((ROOT / "ir").rglob("*.py")) + [
    ROOT / "lowering" / "weight_names.py", ROOT / "plait" / "commands" / "spec.py",
    ROOT / "plait" / "commands" / "megatron.py"]


def _names_a_kind(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in kinds.names()
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_names_a_kind(e) for e in node.elts)
    return False


def kind_branches(source: str) -> list[tuple[int, str]]:
    """(line, what) of each comparison against a kind's name and each literal kind lookup."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and (_names_a_kind(node.left)
                                              or any(_names_a_kind(c) for c in node.comparators)):
            hits.append((node.lineno, "compare"))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("block", "count") and node.args and _names_a_kind(node.args[0])):
            hits.append((node.lineno, "lookup"))
    return sorted(hits)


def test_the_scanner_finds_branches_and_lookups():
    source = ('if kind == "moe":\n    pass\n'
              'dense = "mlp" in model.layers\n'
              'x = kind in ("attention", "mlp")\n'
              'heads = model.block("mamba").heads\n'
              'n = model.count("attention")\n'
              'fine = kinds.facet(kind, "counts").params(model) if kind in present else 0\n')
    assert kind_branches(source) == [(1, "compare"), (3, "compare"), (4, "compare"), (5, "lookup"),
                                     (6, "lookup")]


def test_the_ir_core_has_no_kind_branches():
    assert all(p.is_file() for p in CORE)
    found = {str(p.relative_to(ROOT)): kind_branches(p.read_text()) for p in CORE}
    assert {path: hits for path, hits in found.items() if hits} == {}
