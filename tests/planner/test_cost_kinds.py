"""The cost model asks each block kind's cost facet (plait/kinds/<kind>/cost.py) for its terms:
every registered kind speaks the same protocol (tests/kinds/test_core_kind_branches.py holds the
core, planner/cost included, to no kind-name branches)."""
import inspect
import re
from pathlib import Path

import pytest

from plait.ir import kinds
from plait.kinds import absent
from plait.kinds.attention import cost as attention_cost

ROOT = Path(__file__).resolve().parents[2]


def protocol_functions(module) -> dict[str, tuple[str, ...]]:
    """The protocol's functions a facet module defines itself or binds to plait/kinds/absent.py's
    "nothing of that" functions, with their parameter names."""
    out = {}
    for name in attention_cost.PROTOCOL:
        fn = getattr(module, name, None)
        if inspect.isfunction(fn) and fn.__module__ in (module.__name__, absent.__name__):
            out[name] = tuple(inspect.signature(fn).parameters)
    return out


def test_the_protocol_is_the_one_the_attention_docstring_documents():
    documented = re.findall(r"^    (\w+)\(", attention_cost.__doc__, flags=re.M)
    assert tuple(documented) == attention_cost.PROTOCOL


@pytest.mark.parametrize("kind", kinds.names())
def test_every_kind_cost_facet_exposes_the_same_functions(kind):
    reference = protocol_functions(attention_cost)
    assert set(reference) == set(attention_cost.PROTOCOL)
    assert protocol_functions(kinds.facet(kind, "cost")) == reference


def test_a_kinds_own_groups_reach_the_topology_facts_through_its_facet():
    from plait.ir.dsl import load_job
    from plait.ir.plan import Layout
    from plait.planner.explain import topology_facts
    moe = load_job(str(ROOT / "specs" / "jobs" / "mixtral-8x22b-128gpu.plait"))
    dense = load_job(str(ROOT / "specs" / "jobs" / "nemotron-h-56b-pretrain.plait"))
    across = Layout(tp=2, dp=8, pp=8, ep=16, etp=1, edp=1)
    assert topology_facts(moe, across, only_bad=True) == [
        "expert all-to-all crosses nodes (ep group of 16 spans 2 nodes)"]
    assert not any("expert" in fact for fact in topology_facts(dense, Layout(tp=8, cp=4, dp=4, pp=2)))
