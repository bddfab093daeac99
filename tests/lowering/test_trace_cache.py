"""The trace and shape caches (lowering/trace_cache.py): a hit gives exactly what an uncached
compile gives (same code, same shapes, same outputs), different models or micro-batches never share
an entry, and ranks of one program trace once."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from plait.ir.dsl import load_model
from plait.ir.plan import Layout
from plait.lowering import trace_cache
from plait.lowering.build import build_model
from plait.lowering.compile import lower, program_text
from plait.lowering.trace import trace_model

from passes_util import SEQ, SPEC, plan

SPECS = Path(__file__).resolve().parents[2] / "specs" / "models"


@pytest.fixture(autouse=True)
def empty_caches():
    trace_cache.clear()
    yield
    trace_cache.clear()


def _tiny(kind: str):
    return load_model(str(SPECS / f"tiny-{kind}.plait"))


def _node_facts(gm) -> list:
    return [(n.name, n.op, str(n.target), n.meta.get("plait"), n.meta.get("tensor_meta"))
            for n in gm.graph.nodes]


def _batch(spec, n=2):
    tokens = torch.randint(0, spec.vocab, (n, SEQ), generator=torch.Generator().manual_seed(3))
    return tokens, torch.roll(tokens, -1, 1)


def _lower_all(spec, layout):
    p = plan(layout, spec=spec)
    return [lower(build_model(spec, seed=0), spec, p, r) for r in range(p.layout.world)]


# two ranks each (an uncached compile is the expensive part): TP peers, DP x EP peers, PP stages
@pytest.mark.parametrize("kind,layout", [("dense", Layout(tp=2, sp=True)),
                                         ("moe", Layout(dp=2, ep=2)),
                                         ("hybrid", Layout(pp=2))])
def test_cached_programs_equal_uncached_ones_rank_by_rank(kind, layout):
    spec = _tiny(kind)
    with trace_cache.disabled():
        want = _lower_all(spec, layout)
    assert trace_cache.TRACES.misses == 0 and not trace_cache.TRACES.items  # really bypassed
    got = _lower_all(spec, layout)
    assert trace_cache.TRACES.misses == 1 and trace_cache.TRACES.hits == len(got) - 1  # traced once
    assert trace_cache.SHAPES.hits > 0  # ranks with the same graph fake-ran it once
    for g, w in zip(got, want):
        assert program_text(g) == program_text(w)
        assert g.stage_io == w.stage_io and g.shards == w.shards
        for c in g.chunk_indices:
            assert _node_facts(g.stage(c)) == _node_facts(w.stage(c))


def test_a_hit_runs_the_new_models_own_weights_and_computes_what_an_uncached_compile_does():
    spec, layout = SPEC, Layout(pp=2)
    tokens, labels = _batch(spec)
    first = lower(build_model(spec, seed=0), spec, plan(layout, spec=spec), 0)
    model = build_model(spec, seed=1)  # other weights, same structure: a hit
    program = lower(model, spec, plan(layout, spec=spec), 0)
    assert trace_cache.TRACES.hits == 1
    mine = {id(p) for p in model.parameters()}
    assert all(id(p) in mine for c in program.chunk_indices for p in program.stage(c).parameters())
    with trace_cache.disabled():
        fresh = lower(build_model(spec, seed=1), spec, plan(layout, spec=spec), 0)
    assert torch.equal(program.pipe(tokens, labels), fresh.pipe(tokens, labels))
    assert not torch.equal(program.pipe(tokens, labels), first.pipe(tokens, labels))


def test_models_that_differ_in_structure_never_share_a_trace():
    gm = trace_model(build_model(SPEC, seed=0), SPEC, 1, SEQ)
    other = build_model(SPEC, seed=0)
    other.layers[0].mixer.scale = 0.5  # a Python float the graph bakes in as a literal
    got = trace_model(other, SPEC, 1, SEQ)
    assert trace_cache.TRACES.hits == 0
    with trace_cache.disabled():
        want = trace_model(build_model(SPEC, seed=0), SPEC, 1, SEQ)
        changed = build_model(SPEC, seed=0)
        changed.layers[0].mixer.scale = 0.5
        want_changed = trace_model(changed, SPEC, 1, SEQ)
    assert gm.code == want.code and got.code == want_changed.code and got.code != gm.code
    assert "0.5" in got.code


@pytest.mark.parametrize("change", ["spec", "micro-batch", "dtype", "moe options"])
def test_each_part_of_the_key_separates_entries(change):
    spec = _tiny("moe")
    trace_model(build_model(spec, seed=0), spec, 1, SEQ)
    if change == "spec":
        other = replace(spec, hidden=spec.hidden * 2)
        gm = trace_model(build_model(other, seed=0), other, 1, SEQ)
        assert gm.meta["plait.logical_shapes"]["embed.weight"][1] == spec.hidden * 2
    elif change == "micro-batch":
        gm = trace_model(build_model(spec, seed=0), spec, 2, 2 * SEQ)
        loss_input = next(n for n in gm.graph.nodes if n.op == "placeholder")
        assert tuple(loss_input.meta["tensor_meta"].shape) == (2, 2 * SEQ)
    elif change == "dtype":
        gm = trace_model(build_model(spec, dtype=torch.float64, seed=0), spec, 1, SEQ)
        assert "torch.float64" in {str(n.meta["tensor_meta"].dtype) for n in gm.graph.nodes
                             if n.op == "call_module" and "tensor_meta" in n.meta}
    else:
        from plait.ir.job import MoEOptions
        gm = trace_model(build_model(spec, seed=0, moe_options=MoEOptions(capacity_factor=1.0)),
                         spec, 1, SEQ)
    assert trace_cache.TRACES.hits == 0 and trace_cache.TRACES.misses == 2


def test_a_module_with_state_the_key_cannot_describe_is_traced_afresh():
    model = build_model(SPEC, seed=0)
    model.layers[0].mixer.helper = object()  # unknown state: no key, no cache entry
    assert trace_cache.module_key(model) is None
    trace_model(model, SPEC, 1, SEQ)
    trace_model(model, SPEC, 1, SEQ)
    assert not trace_cache.TRACES.items and trace_cache.TRACES.hits == 0


def test_tied_and_untied_weights_are_different_structures():
    a, b = build_model(SPEC, seed=0), build_model(SPEC, seed=0)
    b.head.weight = b.embed.weight  # b's head tied to its own embedding
    assert trace_cache.module_key(a) != trace_cache.module_key(b)
