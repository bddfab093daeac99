"""The cost model asks each block kind's cost facet (plait/kinds/<kind>/cost.py) for its terms:
every registered kind speaks the same protocol, and planner/cost never branches on a kind's name."""
import ast
import inspect
import re
from pathlib import Path

import pytest

from plait.ir import kinds
from plait.kinds.attention import cost as attention_cost

ROOT = Path(__file__).resolve().parents[2]
CORE = sorted((ROOT / "planner" / "cost").glob("*.py")) + [ROOT / "planner" / "explain.py",
                                                          ROOT / "planner" / "fingerprint.py"]


def protocol_functions(module) -> dict[str, tuple[str, ...]]:
    """The protocol's functions a facet module defines itself, with their parameter names."""
    out = {}
    for name in attention_cost.PROTOCOL:
        fn = getattr(module, name, None)
        if inspect.isfunction(fn) and fn.__module__ == module.__name__:
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


def kind_branches(source: str, names) -> list[int]:
    """Lines that compare against a kind's name or look one up by a literal
    (``model.block("moe")``, ``model.count("mamba")``): /work/tools/kind_branches.py's rule."""
    def literal(node) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in names
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(literal(e) for e in node.elts)
        return False

    hits = []
    for node in ast.walk(ast.parse(source)):
        compared = isinstance(node, ast.Compare) and [node.left, *node.comparators]
        if compared and any(map(literal, compared)):
            hits.append(node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("block", "count") and node.args and literal(node.args[0])):
            hits.append(node.lineno)
    return hits


def test_the_branch_finder_finds_branches():
    source = ('if kind == "moe": pass\n'
              'x = kind in ("attention", "x")\n'
              'm = model.block("mamba")\n'
              'n = model.count("mlp")\n'
              'ok = kind == "norm" or facet(kind, "cost")\n')
    assert kind_branches(source, kinds.names()) == [1, 2, 3, 4]


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_cost_model_core_never_branches_on_a_kind_name(path):
    assert kind_branches(path.read_text(), kinds.names()) == []


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
