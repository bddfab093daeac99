"""The lowering-level facets of every block kind (plait/kinds/<kind>/module.py, parallelize.py,
prune.py) define nothing public beyond their protocol (test_kind_facets.py's PROTOCOL, the names
the attention facets' docstrings state): a kind's own helpers are private or live in its package's
other modules. The prune facet's planner half loads without torch."""
import inspect
import subprocess
import sys

import pytest

from plait.ir import kinds
from test_kind_facets import PROTOCOL

LOWERING_FACETS = ("module", "parallelize", "prune")


def public_functions(facet) -> set[str]:
    """Functions a facet module defines itself, without its private helpers."""
    return {name for name, f in inspect.getmembers(facet, inspect.isfunction)
            if f.__module__ == facet.__name__ and not name.startswith("_")}


@pytest.mark.parametrize("which", LOWERING_FACETS)
def test_no_kind_defines_functions_beyond_the_protocol(which):
    for kind in kinds.names():
        extra = public_functions(kinds.facet(kind, which)) - set(PROTOCOL[which])
        assert not extra, f"{kind}'s {which} facet defines {extra} beyond the protocol"


def test_the_planner_half_of_the_prune_facet_loads_without_torch():
    """planner/prune reads every kind's prune facet; that must not pull torch in."""
    code = ("import sys; from plait.ir import kinds; "
            "[kinds.facet(k, 'prune') for k in kinds.names()]; import plait.planner.prune.plan; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
