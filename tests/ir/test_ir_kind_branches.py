"""The ir-level core never branches on a block kind's name (issue #16): no comparison or membership
test against a kind's literal name, and no literal lookup such as ``model.block("moe")`` or
``model.count("mamba")``, in ir/ (the family importers included) or in the ir-level files outside
it that map kinds (lowering/weight_names.py, plait/commands/spec.py and megatron.py). What is
specific to a kind lives in its package, plait/kinds/<kind>/, and is reached through the registry.
The scanner (tests/kind_branch_util.py) is the AST rule of tools/kind_branches.py, with the kind
names taken from the registry."""
from pathlib import Path

from kind_branch_util import kind_branches

ROOT = Path(__file__).resolve().parents[2]
CORE = sorted((ROOT / "ir").rglob("*.py")) + [
    ROOT / "lowering" / "weight_names.py", ROOT / "plait" / "commands" / "spec.py",
    ROOT / "plait" / "commands" / "megatron.py"]


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
