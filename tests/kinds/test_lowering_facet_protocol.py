"""The lowering-level facets of every block kind (plait/kinds/<kind>/module.py, parallelize.py,
prune.py) expose one protocol, the one the attention facets' docstrings state, so the core calls
any kind's facet without knowing which kind it is; the prune facet's planner half loads without
torch."""
import inspect
import subprocess
import sys

import pytest

from plait.ir import kinds

PROTOCOL = {
    "module": ("mixer", "traced_whole"),
    "parallelize": ("tensor_parallel", "tp_sizes", "sequence_ops", "check_context_parallel",
                    "routed_experts"),
    "prune": ("axis_groups", "axis_step", "structure_hint", "layout_divisors", "narrowed",
              "check_prunable", "importance_hooks", "magnitude", "slice_index"),
}


def public_functions(facet) -> set[str]:
    """Functions a facet module defines itself, without its private helpers."""
    return {name for name, f in inspect.getmembers(facet, inspect.isfunction)
            if f.__module__ == facet.__name__ and not name.startswith("_")}


@pytest.mark.parametrize("which", sorted(PROTOCOL))
def test_every_kind_exposes_the_same_protocol(which):
    reference = kinds.facet(kinds.names()[0], which)
    for name in PROTOCOL[which]:
        assert name in inspect.getdoc(reference), f"{which} protocol name {name} undocumented"
    for kind in kinds.names():
        facet = kinds.facet(kind, which)
        for name in PROTOCOL[which]:
            assert callable(getattr(facet, name, None)), f"{kind}'s {which} facet lacks {name}"
            mine, theirs = getattr(facet, name), getattr(reference, name)
            assert list(inspect.signature(mine).parameters) == list(inspect.signature(theirs).parameters), \
                f"{kind}.{which}.{name} takes other arguments than the protocol's"
        extra = public_functions(facet) - set(PROTOCOL[which])
        assert not extra, f"{kind}'s {which} facet defines {extra} beyond the protocol"


def test_the_planner_half_of_the_prune_facet_loads_without_torch():
    """planner/prune reads every kind's prune facet; that must not pull torch in."""
    code = ("import sys; from plait.ir import kinds; "
            "[kinds.facet(k, 'prune') for k in kinds.names()]; import plait.planner.prune.plan; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
