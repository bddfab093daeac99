"""The pruning ILP against brute force: random small knapsack instances, and whole tiny prune jobs
where every (hidden, widths, layer counts) combination is counted exactly with ir/counts.py."""
import itertools
import math
import random
from dataclasses import replace

import pytest

from plait.ir import counts
from plait.ir.dsl import load_model
from plait.ir.errors import PlaitError
from plait.ir.job import AxisSearch, PruneJob, PruneTarget
from plait.planner.prune import ilp
from plait.planner.prune.options import KIND_AXES, pruned_spec
from plait.planner.prune.plan import plan_prune
from plait.planner.prune.scores import Retention, random_scores, weighted_log
from plait.planner.prune.widths import axis_widths, depth_counts


def brute_force(problem: ilp.Problem, forbidden=(), excluded=()):
    best = None
    banned = {(s.choice, s.items) for s in excluded}
    for h, choice in enumerate(problem.choices):
        if h in forbidden:
            continue
        for items in itertools.product(*(range(len(g)) for g in choice.groups)):
            cost = ilp.selection_cost(problem, h, items)
            if (h, items) in banned or any(c > l for c, l in zip(cost, problem.limits)):
                continue
            value = ilp.selection_value(problem, h, items)
            if best is None or value > best[0] + 1e-12:
                best = (value, h, items)
    return best


def random_problem(rng: random.Random, budgets: int) -> ilp.Problem:
    def cost():
        return tuple(rng.randint(1, 20) for _ in range(budgets))
    choices = []
    for _ in range(rng.randint(1, 4)):
        groups = tuple(tuple(ilp.Item(-rng.random(), cost()) for _ in range(rng.randint(1, 4)))
                       for _ in range(rng.randint(1, 3)))
        choices.append(ilp.Choice(-rng.random(), cost(), groups))
    return ilp.Problem(tuple(choices), tuple(float(rng.randint(10, 60)) for _ in range(budgets)))


@pytest.mark.parametrize("seed", range(12))
def test_ilp_matches_brute_force_on_random_instances(seed):
    rng = random.Random(seed)
    problem = random_problem(rng, budgets=1 + seed % 3)
    forbidden = {0} if seed % 4 == 3 and len(problem.choices) > 1 else set()
    expected = brute_force(problem, forbidden)
    got = ilp.solve(problem, forbidden)
    if expected is None:
        assert got is None
        return
    assert got is not None and got.status == ilp.OPTIMAL
    assert got.value == pytest.approx(expected[0], abs=1e-9)
    assert all(c <= l + 1e-9 for c, l in zip(ilp.selection_cost(problem, got.choice, got.items), problem.limits))
    # cutting the optimum gives the second best, as brute force does
    second = brute_force(problem, forbidden, [got])
    again = ilp.solve(problem, forbidden, [got])
    assert (again is None) == (second is None)
    if second is not None:
        assert again.value == pytest.approx(second[0], abs=1e-9)
        assert (again.choice, again.items) != (got.choice, got.items)


def best_per_choice(problem: ilp.Problem) -> list[tuple[float, int]]:
    out = []
    for h in range(len(problem.choices)):
        best = brute_force(problem, forbidden=set(range(len(problem.choices))) - {h})
        if best is not None:
            out.append((best[0], h))
    return sorted(out, key=lambda vh: (-vh[0], vh[1]))


@pytest.mark.parametrize("seed", range(8))
def test_solve_top_gives_the_best_choices_in_one_solve(seed):
    rng = random.Random(100 + seed)
    problem = random_problem(rng, budgets=1 + seed % 2)
    k = 1 + seed % 3
    expected = best_per_choice(problem)[:k]
    got = ilp.solve_top(problem, k)
    assert [s.value for s in got] == pytest.approx([v for v, _ in expected], abs=1e-9)
    assert len({s.choice for s in got}) == len(got)
    for s in got:
        assert all(c <= l + 1e-9 for c, l in zip(ilp.selection_cost(problem, s.choice, s.items), problem.limits))


def test_infeasible_budget_gives_none():
    problem = ilp.Problem((ilp.Choice(0.0, (5.0,), ((ilp.Item(0.0, (5.0,)),),)),), (9.0,))
    assert ilp.solve(problem) is None


def _tiny_job(model_path, axes, depth=(), **target) -> PruneJob:
    model = load_model(model_path)
    return PruneJob(name="p", model=model, target=PruneTarget(**target), axes=tuple(axes), depth=depth)


def brute_force_job(job: PruneJob, scores):
    """Best weighted-log objective over every legal architecture, counted exactly."""
    model, retention = job.model, Retention(scores, job.model)
    widths = axis_widths(job, {})
    kinds = tuple(dict.fromkeys(model.layers))
    axes = [a for k in kinds for a in KIND_AXES[k]]
    best = None
    for h in widths["hidden"].widths:
        for combo in itertools.product(*(widths[a].widths for a in axes)):
            w = dict(zip(axes, combo))
            for ns in itertools.product(*(depth_counts(job, k) for k in kinds)):
                keep = sorted(i for k, n in zip(kinds, ns) for i in retention.kept_layers(k, n))
                spec = pruned_spec(model, h, w, tuple(model.layers[i] for i in keep))
                if counts.params(spec).total > job.target.params:
                    continue
                value = weighted_log(model, "hidden", retention.axis("hidden", h))
                value += sum(weighted_log(model, a, retention.axis(a, x)) for a, x in w.items())
                value += sum(weighted_log(model, "depth:" + k, retention.depth(k, n))
                             for k, n in zip(kinds, ns) if k in job.depth)
                if best is None or value > best[0]:
                    best = (value, spec)
    return best


@pytest.mark.parametrize("path,axes,depth,fraction", [
    ("specs/models/tiny-dense.plait", ("hidden", "ffn"), ("attention", "mlp"), 0.5),
    ("specs/models/tiny-hybrid.plait", ("hidden", "mamba_heads", "mamba_head_dim"), ("mamba",), 0.6),
    ("specs/models/tiny-moe.plait", ("experts", "ffn", "attention_heads"), ("moe",), 0.55),
])
def test_plan_matches_brute_force_on_tiny_models(path, axes, depth, fraction):
    model = load_model(path)
    steps = {"hidden": 32, "ffn": 64, "mamba_head_dim": 8}  # coarse grids keep brute force small
    job = _tiny_job(path, [AxisSearch(a, "search", step=steps.get(a)) for a in axes], depth,
                    params=int(fraction * counts.params(model).total))
    scores = random_scores(model, seed=3)
    expected = brute_force_job(job, scores)
    result = plan_prune(job, scores, top=1)
    best = result.plan.chosen
    assert best.params == counts.params(best.model).total <= job.target.params
    assert math.log(best.score) == pytest.approx(expected[0], abs=1e-9)


def test_depth_pruning_refuses_to_renumber_per_layer_windows():
    """full_layers names attention layers by index; dropping some would silently move the full
    ones. Widths alone, or one window everywhere, prune as before."""
    model = load_model("specs/models/tiny-dense.plait")
    mixed = replace(model, attention=replace(model.attention, window=8, full_layers=(1,)))
    with pytest.raises(PlaitError, match="full_layers = \\[1\\]"):
        pruned_spec(mixed, model.hidden, {}, mixed.layers[2:])
    assert pruned_spec(mixed, model.hidden, {"attention_heads": 2}, mixed.layers).attention.full_layers == (1,)
    everywhere = replace(model, attention=replace(model.attention, window=8))
    assert pruned_spec(everywhere, model.hidden, {}, everywhere.layers[2:]).attention.window == 8
