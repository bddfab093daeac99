"""The pruning planner's driver: scores + job -> ranked candidates -> a PrunePlan.

1. Candidate widths per axis (widths.py) and layer counts per block kind.
2. Per hidden size and block kind, every (widths, count) option with exact costs (options.py).
3. The ILP (ilp.py) keeps the most importance under the budgets. The ranked candidates are the
   best models of the best hidden sizes (one solve), so the ranking shows real alternatives
   rather than near-copies; with a single hidden size, the next best selections (no-good cuts).
4. Each selection is re-counted exactly on its pruned spec; with a throughput target it is also
   planned on the job's train setup, and one that misses is cut while the time budget tightens.
5. The best candidate becomes a PrunePlan: the embedding channels, layers, neurons, heads and
   experts of the source model that survive.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from plait.ir import counts
from plait.ir.errors import PlaitError
from plait.ir.job import PruneJob
from plait.ir.model import ModelSpec
from plait.ir.plan import LayerKeep, PruneCandidate, PrunePlan

from . import ilp
from .axes import channel_axis, unit_axis
from .options import KIND_AXES, HiddenChoice, fixed_costs, kind_options, pruned_spec
from .scores import (ImportanceScores, Retention, axis_original, check_scores, keep_units, score, top_indices,
                     uniform_scores, weighted_log)
from .throughput import ThroughputModel
from .widths import axis_widths, depth_counts, layout_divisors

MAX_EXTRA_SOLVES = 24  # solves spent on selections the exact checks reject


@dataclass
class PruneResult:
    plan: PrunePlan
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    solves: int = 0
    options: int = 0  # ILP binaries after dominance


@dataclass
class _Setup:
    job: PruneJob
    retention: Retention
    budgets: tuple[str, ...]
    limits: list[float]
    choices: list[HiddenChoice]
    kinds: tuple[str, ...]
    tput: Optional[ThroughputModel]


def plan_prune(job: PruneJob, scores: Optional[ImportanceScores] = None, top: int = 5,
               time_limit: float = 10.0) -> PruneResult:
    """Ranked candidates for ``job`` (at most ``top``) and the plan of the best."""
    start = time.perf_counter()
    scores = scores or uniform_scores(job.model)
    check_scores(scores, job.model)
    setup = _setup(job, scores)
    result = PruneResult(plan=None, options=sum(len(g) for c in setup.choices for g in c.options))
    candidates = _rank(setup, top, time_limit, result)
    best = candidates[0]
    result.plan = PrunePlan(job=job.name, source=job.model.name, importance=scores.method,
                            hidden=top_indices(scores.hidden, best[0].model.hidden),
                            layers=_layer_keeps(setup, scores, best[1]), candidates=tuple(c for c, _ in candidates))
    result.seconds = time.perf_counter() - start
    return result


def _setup(job: PruneJob, scores: ImportanceScores) -> _Setup:
    model = job.model
    tput = ThroughputModel(job.train, model) if job.train is not None else None
    widths = axis_widths(job, layout_divisors(job, tput.pins if tput else None))
    budgets, limits = _budgets(job, tput)
    retention = Retention(scores, model)
    kinds = tuple(dict.fromkeys(model.layers))
    bpp = counts.stored_weight_bytes(job.target.precision)
    layer_time = tput.layer_time if tput and "seconds" in budgets else None
    extra_time = tput.extra_time if tput and "seconds" in budgets else None
    choices = []
    for h in widths["hidden"].widths:
        spec = pruned_spec(model, h, {}, model.layers)
        options = tuple(kind_options(model, h, k, widths, depth_counts(job, k), retention, budgets, bpp, layer_time)
                        for k in kinds)
        choices.append(HiddenChoice(h, fixed_costs(spec, bpp, extra_time),
                                    weighted_log(model, "hidden", retention.axis("hidden", h)), options))
    return _Setup(job, retention, budgets, limits, choices, kinds, tput)


def _budgets(job: PruneJob, tput: Optional[ThroughputModel]) -> tuple[tuple[str, ...], list[float]]:
    t = job.target
    pairs = [("params", t.params), ("active_params", t.active_params), ("weight_bytes", t.weight_memory)]
    if t.throughput is not None:
        pairs.append(("seconds", tput.budget_seconds(t.throughput)))
    pairs = [(b, float(v)) for b, v in pairs if v is not None]
    return tuple(b for b, _ in pairs), [v for _, v in pairs]


def _problem(setup: _Setup) -> ilp.Problem:
    b = setup.budgets
    return ilp.Problem(
        choices=tuple(ilp.Choice(c.value, c.costs.vector(b),
                                 tuple(tuple(ilp.Item(o.value, o.costs.vector(b)) for o in group)
                                       for group in c.options))
                      for c in setup.choices),
        limits=tuple(setup.limits))


# ------------------------------------------------------------------------------------------------
# Ranking
# ------------------------------------------------------------------------------------------------

def _rank(setup: _Setup, top: int, time_limit: float, result: PruneResult) -> list:
    """Accepted candidates, best first. Several hidden sizes: each round solves for the best of as
    many hidden sizes as places are left (one solve), then forbids the accepted ones. One hidden
    size: each round solves for the next best selection (no-good cuts)."""
    forbidden: set[int] = set()
    excluded: list[ilp.Selection] = []
    found: list = []
    rejected = 0
    several = len(setup.choices) > 1
    while len(found) < top and rejected <= MAX_EXTRA_SOLVES:
        batch = ilp.solve_top(_problem(setup), top - len(found) if several else 1, forbidden, excluded, time_limit)
        result.solves += 1
        if not batch:
            break
        for sel in batch:
            if sel.status != ilp.OPTIMAL:
                result.notes.append(f"hidden {setup.choices[sel.choice].hidden}: the ILP hit its time limit")
            candidate, reason = _candidate(setup, sel)
            if reason is not None:
                rejected += 1
                result.notes.append(reason)
                excluded.append(sel)
                continue
            found.append((candidate, sel))
            (forbidden.add(sel.choice) if several else excluded.append(sel))
    if not found:
        raise _unreachable(setup)
    found.sort(key=lambda cs: -cs[0].score)
    return found


def _candidate(setup: _Setup, sel: ilp.Selection) -> tuple[Optional[PruneCandidate], Optional[str]]:
    """The selection as an exact candidate, or the reason the exact checks reject it."""
    job, choice = setup.job, setup.choices[sel.choice]
    picked = [group[i] for group, i in zip(choice.options, sel.items)]
    widths = {a: w for o in picked for a, w in o.widths}
    keep = sorted(i for o in picked for i in setup.retention.kept_layers(o.kind, o.count))
    spec = pruned_spec(job.model, choice.hidden, widths, tuple(job.model.layers[i] for i in keep), name=job.name)
    p = counts.params(spec)
    exact = {"params": p.total, "active_params": p.active,
             "weight_bytes": counts.weight_bytes(spec, job.target.precision)}
    for b, limit in zip(setup.budgets, setup.limits):
        if b in exact and exact[b] > limit:
            return None, f"cut a selection over {b} by {exact[b] - limit:,.0f} (solver tolerance)"
    pred = setup.tput.predict(spec) if setup.tput else None
    goal = job.target.throughput
    if goal is not None and (pred is None or pred.tokens_per_s < goal):
        got = "cannot run under the layout" if pred is None else f"{pred.tokens_per_s:,.0f} tokens/s"
        if pred is not None:  # tighten the surrogate time budget by the miss
            i = setup.budgets.index("seconds")
            setup.limits[i] *= pred.tokens_per_s / goal
        return None, f"cut hidden {choice.hidden} {_describe(widths, picked)}: {got} < target {goal:,.0f}"
    retained = _retained(setup, choice.hidden, picked)
    return PruneCandidate(
        model=spec, params=p.total, active_params=p.active, weight_bytes=exact["weight_bytes"],
        retained=retained, score=score(job.model, retained),
        tokens_per_s=pred.tokens_per_s if pred else None, layout=pred.layout if pred else None), None


def _retained(setup: _Setup, hidden: int, picked) -> tuple[tuple[str, float], ...]:
    r = setup.retention
    out = [("hidden", r.axis("hidden", hidden))]
    for o in picked:
        out += [(a, r.axis(a, w)) for a, w in o.widths]
        if o.kind in setup.job.depth:
            out.append((f"depth:{o.kind}", r.depth(o.kind, o.count)))
    return tuple(out)


def _describe(widths: dict, picked) -> str:
    parts = [f"{a} {w}" for a, w in widths.items()]
    parts += [f"{o.count} {o.kind}" for o in picked]
    return ", ".join(parts)


def _layer_keeps(setup: _Setup, scores: ImportanceScores, sel: ilp.Selection) -> tuple[LayerKeep, ...]:
    choice = setup.choices[sel.choice]
    picked = [g[i] for g, i in zip(choice.options, sel.items)]
    return keeps_for(setup.job.model, scores, {a: w for o in picked for a, w in o.widths},
                     {o.kind: o.count for o in picked})


def keeps_for(model: ModelSpec, scores: ImportanceScores, widths: dict[str, int],
              layer_counts: dict[str, int]) -> tuple[LayerKeep, ...]:
    """What ``scores`` keep of ``model`` at the given axis widths and layers per kind: the most
    important layers of each kind, and in each the most important units (and channels, where the
    kind has a channel axis: mamba)."""
    retention = Retention(scores, model)
    keep = sorted(i for kind, n in layer_counts.items() for i in retention.kept_layers(kind, n))
    out = []
    for i in keep:
        s = scores.layers[i]
        channel = channel_axis(s.kind)
        channels = top_indices(s.channels, widths[channel]) if channel is not None else ()
        out.append(LayerKeep(i, s.kind, keep_units(model, s, widths[unit_axis(s.kind)]), channels))
    return tuple(out)


def plan_for_architecture(job: PruneJob, scores: ImportanceScores, architecture: ModelSpec) -> PrunePlan:
    """The plan that gives ``job.model`` the shape of ``architecture`` (its widths and its number of
    layers of each kind) keeping what ``scores`` rank highest: to compare importance estimators on
    one architecture."""
    check_scores(scores, job.model)
    model = job.model
    widths = {a: axis_original(architecture, a) for k in dict.fromkeys(model.layers) for a in KIND_AXES[k]}
    layer_counts = {k: architecture.count(k) for k in dict.fromkeys(model.layers)}
    layers = keeps_for(model, scores, widths, layer_counts)
    spec = pruned_spec(model, architecture.hidden, widths, tuple(model.layers[k.layer] for k in layers),
                       name=architecture.name)
    r = Retention(scores, model)
    retained = [("hidden", r.axis("hidden", spec.hidden))] + [(a, r.axis(a, w)) for a, w in widths.items()]
    retained += [(f"depth:{k}", r.depth(k, n)) for k, n in layer_counts.items() if n < model.count(k)]
    p = counts.params(spec)
    candidate = PruneCandidate(model=spec, params=p.total, active_params=p.active,
                               weight_bytes=counts.weight_bytes(spec, job.target.precision),
                               retained=tuple(retained), score=score(model, retained))
    return PrunePlan(job=job.name, source=model.name, importance=scores.method,
                     hidden=top_indices(scores.hidden, spec.hidden), layers=layers, candidates=(candidate,))


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

BUDGET_NAMES = {"params": "params", "active_params": "active params", "weight_bytes": "weight memory",
                "seconds": "throughput"}


def _unreachable(setup: _Setup) -> PlaitError:
    """Which budget the smallest legal model already exceeds, with the numbers."""
    smallest = [min(_least(c, setup.budgets, b) for c in setup.choices) for b in range(len(setup.budgets))]
    over = [(setup.budgets[b], smallest[b], setup.limits[b]) for b in range(len(setup.budgets))
            if smallest[b] > setup.limits[b]]
    if not over:
        return PlaitError("no pruned model meets all the budgets together",
                          hint="each budget alone is reachable; relax one of them")
    name, least, limit = over[0]
    if name == "seconds":
        t = setup.tput
        best = setup.job.train.global_batch * setup.job.train.seq_len / (least * t.seconds_factor)
        return PlaitError(f"unreachable target: the fastest legal model trains at about {best:,.0f} tokens/s "
                          f"on {setup.job.train.name}, below the target {setup.job.target.throughput:,.0f}",
                          hint="lower the throughput target, allow more axes or depth, or use more GPUs")
    unit = " bytes" if name == "weight_bytes" else ""
    return PlaitError(f"unreachable target: {BUDGET_NAMES[name]} {limit:,.0f}{unit} is below the smallest legal "
                      f"model's {least:,.0f}{unit}",
                      hint="allow more axes (axes { ... = auto }) or depth, or lower the axes' min widths")


def _least(choice: HiddenChoice, budgets: tuple[str, ...], b: int) -> float:
    """The least cost on budget ``b`` of any model with this hidden size."""
    return choice.costs.vector(budgets)[b] + sum(min(o.costs.vector(budgets)[b] for o in group)
                                                 for group in choice.options)
