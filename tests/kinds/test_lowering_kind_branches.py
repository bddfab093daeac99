"""lowering/ and planner/prune/ never branch on a block kind's name (issue #16): what is specific
to a kind lives in its package, plait/kinds/<kind>/, and is reached through the registry (the
module, parallelize and prune facets). The scanner is tests/kind_branch_util.py."""
from pathlib import Path

from kind_branch_util import kind_branches

ROOT = Path(__file__).resolve().parents[2]
CORE = ("lowering", "planner/prune")


def test_the_scanner_finds_the_forms_lowering_used_to_take():
    source = ('if layer.kind == "mlp":\n    pass\n'
              'if "mamba" in spec.layers and spec.mamba is not None:\n    pass\n'
              'x = [i for i, kind in enumerate(spec.layers) if kind != "moe"]\n'
              'hd = src.block("attention").head_dim\n'
              'ok = layers.count("attention") != n\n'
              'fine = kinds.facet(kind, "prune").narrowed(block, widths)\n')
    assert kind_branches(source) == [(1, "compare"), (3, "compare"), (5, "compare"), (6, "lookup"),
                                     (7, "lookup")]


def test_lowering_and_the_pruning_planner_name_no_kind():
    files = [p for folder in CORE for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 40  # the folders were found
    found = {str(p.relative_to(ROOT)): kind_branches(p.read_text()) for p in files}
    assert {path: hits for path, hits in found.items() if hits} == {}
