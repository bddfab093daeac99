"""The pruning planner on real specs: published pruned shapes counted exactly, the library's 8B plans,
budgets of every kind, layout divisibility, which indices a plan keeps, and the errors."""
import math
from dataclasses import replace

import pytest

from plait.ir import counts
from plait.ir.dsl import load_model, load_prune_job
from plait.ir.errors import PlaitError
from plait.ir.job import AxisSearch, LayoutPins, PruneJob, PruneTarget
from plait.planner.prune.plan import plan_prune
from plait.planner.prune.scores import (ImportanceScores, LayerScores, Retention, random_scores, top_indices,
                                        uniform_scores)
from plait.planner.prune.widths import axis_widths, default_step

NEMOTRON = "specs/jobs/nemotron-h-8b-prune-4.5b.plait"
LLAMA = "specs/jobs/llama-3.1-8b-prune-4.5b.plait"


def fixed(job, **widths):
    return replace(job, axes=tuple(AxisSearch(a, "fixed", value=v) for a, v in widths.items()), depth=(),
                   target=PruneTarget(), train=None, layout=LayoutPins())


@pytest.mark.parametrize("path,widths,published,expected", [
    (NEMOTRON, dict(hidden=3072, ffn=12288, mamba_heads=112), "specs/models/nemotron-h-4b.plait", 4_489_223_040),
    (LLAMA, dict(hidden=3072, ffn=9216), "specs/models/llama-3.1-minitron-4b-width.plait", 4_512_746_496),
])
def test_published_pruned_shapes_count_exactly(path, widths, published, expected):
    job = fixed(load_prune_job(path), **widths)
    plan = plan_prune(job, top=1).plan
    c = plan.chosen
    assert c.params == counts.params(c.model).total == expected
    assert replace(c.model, name="x") == replace(load_model(published), name="x")
    assert len(plan.hidden) == 3072 and len(plan.layers) == job.model.num_layers


@pytest.mark.parametrize("path", [NEMOTRON, LLAMA])
def test_library_8b_plans_meet_the_target(path):
    job = load_prune_job(path)
    result = plan_prune(job, top=5)
    cands = result.plan.candidates
    assert len(cands) == 5 and result.solves == 1
    assert [c.score for c in cands] == sorted((c.score for c in cands), reverse=True)
    assert len({c.model.hidden for c in cands}) == 5  # real alternatives, not near-copies
    tp = job.layout.get("tp")
    for c in cands:
        assert c.params == counts.params(c.model).total <= job.target.params
        assert c.params > 0.95 * job.target.params  # the budget is used, not wasted
        assert c.model.mlp.ffn % tp == 0 and c.model.attention.heads % tp == 0
        assert c.model.hidden % 256 == 0 and c.model.mlp.ffn % 512 == 0
        assert c.tokens_per_s > 0 and c.layout.startswith("tp")
        if c.model.mamba is not None:
            assert c.model.mamba.heads % math.lcm(8, tp) == 0 and c.model.mamba.groups == 8


def tiny_job(path="specs/models/tiny-dense.plait", **kw) -> PruneJob:
    model = load_model(path)
    return PruneJob(name="t", model=model, **kw)


def test_every_budget_kind_is_met():
    job = tiny_job("specs/models/tiny-moe.plait", axes=(AxisSearch("hidden", "search"), AxisSearch("experts", "search"),
                                                          AxisSearch("ffn", "search")), depth=("moe",))
    p = counts.params(job.model)
    for target in (PruneTarget(active_params=int(0.6 * p.active)), PruneTarget(params=int(0.5 * p.total)),
                   PruneTarget(weight_memory=0.5 * p.total * 4, precision="fp32"),
                   PruneTarget(params=int(0.7 * p.total), active_params=int(0.5 * p.active))):
        best = plan_prune(replace(job, target=target), random_scores(job.model, 1), top=2).plan.chosen
        q = counts.params(best.model)
        assert (q.total, q.active) == (best.params, best.active_params)
        assert best.weight_bytes == q.total * counts.stored_weight_bytes(target.precision)
        for budget, value in (("params", q.total), ("active_params", q.active), ("weight_memory", best.weight_bytes)):
            limit = getattr(target, budget)
            assert limit is None or value <= limit


def test_unreachable_target_names_the_numbers():
    job = load_prune_job(LLAMA)
    with pytest.raises(PlaitError) as info:
        plan_prune(replace(job, target=PruneTarget(params=5 * 10 ** 8)))
    message = info.value.message
    assert "unreachable target: params 500,000,000 is below the smallest legal model's" in message
    smallest = int(message.rsplit("model's ", 1)[1].replace(",", ""))
    small = load_model("specs/models/llama-3.1-8b.plait")  # hidden 1024, ffn 3584: the axes' lower bounds
    small = replace(small, hidden=1024, mlp=replace(small.mlp, ffn=3584))
    assert smallest == counts.params(small).total


def test_layout_divisibility_is_respected_or_reported():
    job = tiny_job(axes=(AxisSearch("ffn", "search"),), target=PruneTarget(params=700_000))
    plan = plan_prune(replace(job, layout=LayoutPins((("tp", 2),))), top=3).plan
    assert all(c.model.mlp.ffn % 2 == 0 and c.model.attention.heads % 2 == 0 for c in plan.candidates)
    with pytest.raises(PlaitError, match=r"the model's attention_heads \(4\) must be divisible by tp \(8\).*4 % 8 = 4"):
        plan_prune(replace(job, layout=LayoutPins((("tp", 8),))))
    with pytest.raises(PlaitError, match=r"the job's ffn \(96\) must be divisible by tp \(64\)"):
        plan_prune(replace(job, axes=(AxisSearch("ffn", "fixed", value=96),), layout=LayoutPins((("tp", 64),))))


def test_throughput_target_is_met_by_the_planner():
    job = load_prune_job(NEMOTRON)
    source = plan_prune(replace(job, axes=(), target=PruneTarget(throughput=1.0)), top=1).plan.chosen
    assert source.params == counts.params(job.model).total  # nothing to prune: the source model
    goal = 1.3 * source.tokens_per_s
    result = plan_prune(replace(job, target=PruneTarget(throughput=goal)), top=2)
    for c in result.plan.candidates:
        assert c.tokens_per_s >= goal and c.params < source.params


def test_default_grids():
    job = load_prune_job(NEMOTRON)
    widths = axis_widths(replace(job, layout=LayoutPins()), {})
    assert widths["hidden"].widths == tuple(range(1024, 4097, 256))
    assert widths["mamba_heads"].widths == tuple(range(32, 129, 8))
    assert widths["attention_heads"].widths == (32,) and widths["mamba_head_dim"].widths == (64,)
    tiny = load_model("specs/models/tiny-dense.plait")
    assert default_step(tiny, "hidden") == 16 and default_step(tiny, "ffn") == 32


def test_uniform_prior_keeps_the_width_fraction():
    model = load_model("specs/models/tiny-hybrid.plait")
    r = Retention(uniform_scores(model), model)
    assert r.axis("hidden", 96) == pytest.approx(0.75)
    assert r.axis("mamba_heads", 4) == pytest.approx(0.5)
    assert r.depth("mamba", 3) == pytest.approx(0.75)


def test_kept_indices_follow_the_scores_within_groups():
    model = load_model("specs/models/tiny-hybrid.plait")  # mamba 8 heads in 2 groups, attention 4 heads / 2 kv
    base = uniform_scores(model)
    layers = []
    for s in base.layers:
        if s.kind == "mamba":  # group 0 prefers heads 3, 1; group 1 prefers 4, 7
            s = replace(s, units=(0, 5, 0, 9, 8, 0, 0, 7.0), channels=tuple(float(c % 5) for c in range(32)))
        if s.kind == "attention":
            s = replace(s, units=(1, 2, 5, 3.0))
        layers.append(s)
    scores = replace(base, method="activation", layers=tuple(layers), hidden=tuple(float(i) for i in range(128)))
    job = PruneJob(name="t", model=model, target=PruneTarget(params=10 ** 9),
                   axes=(AxisSearch("mamba_heads", "fixed", value=4), AxisSearch("attention_heads", "fixed", value=2),
                         AxisSearch("hidden", "fixed", value=64), AxisSearch("mamba_head_dim", "fixed", value=8)))
    plan = plan_prune(job, scores, top=1).plan
    assert plan.hidden == tuple(range(64, 128))
    by_kind = {k.kind: k for k in plan.layers}
    assert by_kind["mamba"].units == (1, 3, 4, 7)
    assert by_kind["mamba"].channels == top_indices(tuple(float(c % 5) for c in range(32)), 8)
    assert by_kind["attention"].units == (1, 2)  # one per KV group: head 1 of {0, 1}, head 2 of {2, 3}


def test_depth_keeps_the_most_important_layers():
    model = load_model("specs/models/tiny-dense.plait")
    base = uniform_scores(model)
    blocks = (0.9, 0.1, 0.2, 0.8, 0.7, 0.3, 0.05, 0.6)
    scores = replace(base, layers=tuple(replace(s, block=b) for s, b in zip(base.layers, blocks)))
    job = PruneJob(name="t", model=model, target=PruneTarget(params=int(0.8 * counts.params(model).total)),
                   depth=("attention", "mlp"))
    plan = plan_prune(job, scores, top=1).plan
    kept = [k.layer for k in plan.layers]
    assert plan.chosen.model.layers == tuple(model.layers[i] for i in kept)
    dropped = set(range(8)) - set(kept)
    assert all(blocks[d] <= min(blocks[k] for k in kept if model.layers[k] == model.layers[d]) for d in dropped)


def test_scores_for_another_model_are_rejected():
    job = tiny_job(target=PruneTarget(params=10 ** 6))
    other = uniform_scores(load_model("specs/models/tiny-hybrid.plait"))
    with pytest.raises(PlaitError, match="importance scores do not match model 'tiny-dense'"):
        plan_prune(job, other)


def test_scores_round_trip_json():
    s = random_scores(load_model("specs/models/tiny-moe.plait"), 4)
    assert ImportanceScores.from_json(s.to_json()) == s
    assert isinstance(s.layers[0], LayerScores)


def test_plan_for_architecture_reproduces_the_ilp_plan_and_reselects_by_other_scores():
    from plait.planner.prune.plan import plan_for_architecture

    model = load_model("specs/models/tiny-hybrid.plait")
    job = PruneJob(name="t", model=model, target=PruneTarget(params=int(0.6 * counts.params(model).total)),
                   axes=(AxisSearch("hidden", "search"), AxisSearch("mamba_heads", "search"),
                         AxisSearch("ffn", "search")), depth=("mamba", "mlp"))
    scores = random_scores(model, 5)
    plan = plan_prune(job, scores, top=1).plan
    again = plan_for_architecture(job, scores, plan.model)
    assert (again.hidden, again.layers, again.model) == (plan.hidden, plan.layers, plan.model)
    assert again.chosen.score == pytest.approx(plan.chosen.score)
    other = plan_for_architecture(job, random_scores(model, 6), plan.model)
    # the same widths and layers per kind (so the same count), other channels and other layers
    assert replace(other.model, layers=()) == replace(plan.model, layers=())
    assert sorted(other.model.layers) == sorted(plan.model.layers) and other.chosen.params == plan.chosen.params
    assert other.hidden != plan.hidden and [k.layer for k in other.layers] != [k.layer for k in plan.layers]
