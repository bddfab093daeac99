"""The core never branches on a block kind's name (issue #16): no comparison or membership test
against a kind's literal name and no literal lookup such as ``model.block("moe")`` or
``model.count("mamba")`` anywhere in ir/, planner/, lowering/, runtime/ or plait/ outside the kind
packages (plait/kinds/<kind>/), which hold what is specific to a kind and are reached through the
registry (ir/kinds.py). The scanner is tests/kind_branch_util.py; kind names come from the registry."""
from pathlib import Path

import pytest

from kind_branch_util import kind_branches
from plait.ir import kinds

ROOT = Path(__file__).resolve().parents[2]
CORE_FOLDERS = ("ir", "planner", "lowering", "runtime", "plait")
KIND_PACKAGES = ROOT / "plait" / "kinds"


def core_files() -> list[Path]:
    return [p for folder in CORE_FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))
            if KIND_PACKAGES not in p.parents]


def test_the_scanner_finds_every_form_of_kind_branch():
    source = ('if kind == "moe":\n    pass\n'
              'dense = "mlp" in model.layers\n'
              'x = kind in ("attention", "mlp")\n'
              'heads = model.block("mamba").heads\n'
              'n = model.count("attention")\n'
              'fine = kinds.facet(kind, "counts").params(model) if kind in present else 0\n'
              'also_fine = kind == "norm"\n')
    assert kind_branches(source) == [(1, "compare"), (3, "compare"), (4, "compare"), (5, "lookup"),
                                     (6, "lookup")]


def test_no_core_module_branches_on_a_kind_name():
    files = core_files()
    assert len(files) > 150  # the folders were found
    found = {str(p.relative_to(ROOT)): kind_branches(p.read_text()) for p in files}
    assert {path: hits for path, hits in found.items() if hits} == {}


@pytest.mark.parametrize("name", kinds.names())
def test_every_registered_kind_has_every_facet(name):
    for which in kinds.FACETS:
        assert kinds.facet(name, which).__name__ == f"plait.kinds.{name}.{which}"
