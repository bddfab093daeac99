"""The planner's driver: enumerate -> prune by bounds -> solve -> rank -> explain.

1. Enumerate meshes (tp, cp, pp | etp, ep) the rules and pins allow.
2. Per mesh, two cheap bounds: a memory floor (FSDP-sharded state alone, full recompute) that
   rejects meshes which can never fit, and a time floor (no bubble, no recompute, the largest
   micro-batch) that orders them.
3. Best-first over meshes: expand (mbs, dp flavour, vpp), estimate each with an even split and the
   lightest recompute that fits, stop expanding when a mesh's floor exceeds the best estimates.
4. Solve the stage partition (planner/partition.py: exact for identical units at any vpp and for
   one stage per rank, a balanced partition with its proven gap otherwise) for the candidates in
   order of their estimate until their lower bound passes the top-k step times (branch and
   bound). Deterministic: every order is a sort on numbers with the layout as tie-break, and no
   wall-clock limit decides anything (the ILP's work is bounded by nodes).
5. Runnable-only (`plait plan`, `plait run`): candidates that break a RUNNABLE row of the legality
   table (plait/ir/legality.py) are estimated but neither solved nor counted in the bounds; the few
   best that could beat the winner are solved afterwards and named (planner/runnable.py).
"""
from __future__ import annotations

import heapq
from collections import Counter
from functools import lru_cache
import time as _time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from plait.ir.errors import LayoutError
from plait.ir.job import TrainJob
from plait.ir.legality import Violation
from plait.ir.plan import DP_KINDS, Layout, Optimality, ParallelPlan, Stage

from . import explain, folding, runnable
from .fingerprint import fingerprints
from .cost import memory
from .cost.context import Context
from .cost.evaluate import RankCost, evaluate, sync_time
from .cost.pipeline import OPTIONS, CostTable, even_sizes, stages_of
from .partition import OPTIMAL, Partition, PartitionProblem, rank_totals, solve
from .layouts import blockers, check_pins, job_pins, knob_variants, meshes, units

INF = float("inf")
DEFAULT_KINDS = ("zero1", "fsdp")  # "replicated" moves the same bytes as zero1 and holds more


@dataclass
class Candidate:
    layout: Layout
    table: CostTable
    problem: PartitionProblem
    lower: float  # step-time lower bound
    quick: float = INF  # even split with the lightest recompute that fits
    quick_option: int = -1
    blocked: Optional[Violation] = None  # the RUNNABLE row it breaks (runnable-only searches)

    @property
    def key(self) -> tuple:
        return (self.quick, self.lower, self.layout.short(), self.layout.dp_kind)


@dataclass
class SearchResult:
    plans: list[ParallelPlan]
    rejections: list[explain.Rejection]
    enumerated: int = 0  # layouts (mesh x mbs x dp flavour x vpp) considered
    pruned: int = 0  # dropped by a bound without solving
    solved: int = 0  # ILPs solved
    seconds: float = 0.0
    min_memory: Optional[tuple[float, Layout]] = None  # smallest memory need seen, when none fit
    notes: list[str] = field(default_factory=list)
    # MoE: the best unfolded plan (ETP = TP, EP inside DP; planner/folding.py) when the winner is
    # folded, and the line that says what folding gains
    unfolded: Optional[ParallelPlan] = None
    folding: Optional[str] = None
    # runnable-only: the legal plans better than the winner that plait cannot run yet (or, when
    # nothing runs, the best legal ones), each with the RUNNABLE row that stops it
    blocked: list[runnable.BlockedPlan] = field(default_factory=list)
    runnable_only: bool = False
    why_blocked: dict = field(default_factory=dict, repr=False)  # layout -> Violation

    @property
    def best(self) -> Optional[ParallelPlan]:
        return self.plans[0] if self.plans else None


# ------------------------------------------------------------------------------------------------
# Tables -> partition problems -> plans
# ------------------------------------------------------------------------------------------------

def problem_of(table: CostTable, options: tuple[int, ...]) -> PartitionProblem:
    distinct = list(dict.fromkeys(table.units))
    index = {id(u): i for i, u in enumerate(distinct)}
    lay = table.layout
    return PartitionProblem(
        unit_types=tuple(index[id(u)] for u in table.units),
        time=tuple(tuple(u.time(o) for o in range(3)) for u in distinct),
        act=tuple(u.act for u in distinct), transient=tuple(u.transient for u in distinct),
        static=tuple(table.unit_static(u) for u in distinct), pp=lay.pp, vpp=lay.vpp,
        inflight=tuple(table.inflight(r) for r in range(lay.pp)),
        buffers=tuple(table.buffer_bytes(r) for r in range(lay.pp)),
        chunk_time=table.chunk_time, first_time=table.first.time,
        first_static=table.static_bytes(table.first.params, 0.0),
        last_time=table.last.time, last_static=table.static_bytes(table.last.params, 0.0),
        fragmentation=table.fragmentation, reserve=table.reserve_fixed, capacity=table.capacity,
        options=options)


def make_plan(table: CostTable, sizes, options, notes=(),
              optimality: Optional[Optimality] = None) -> ParallelPlan:
    job = table.job
    stages = stages_of(table, sizes, options)
    common = max(OPTIONS, key=lambda o: (sum(s.recompute == o for s in stages), -OPTIONS.index(o)))
    layout = replace(table.layout, recompute=common)
    return ParallelPlan(
        job=job.name, model=job.model.name, cluster=job.cluster.name, world=job.cluster.world,
        layout=layout, stages=stages, global_batch=job.global_batch, seq_len=job.seq_len,
        schedule="interleaved" if layout.vpp > 1 else "1f1b",
        prediction=evaluate(table, stages), explanation=tuple(notes),
        precision=job.precision.kind, moe=job.moe if job.model.is_moe else None,
        layer_pattern=job.model.pattern, optimality=optimality or Optimality())


# ------------------------------------------------------------------------------------------------
# Bounds
# ------------------------------------------------------------------------------------------------

def memory_floor(job: TrainJob, mesh: Layout, kinds: tuple[str, ...]) -> float:
    """Least bytes the fullest rank needs under ``mesh``: its share of the parameter state under the
    most sharded allowed flavour, the last stage's head, one micro-batch of unit inputs, reserve."""
    best = INF
    for kind in kinds:
        ctx = Context(job, replace(mesh, dp_kind=kind, mbs=1))
        dense = expert = 0.0
        for k in set(job.model.layers):
            d, e = memory.block_params_on_rank(ctx, k)
            n = job.model.count(k)
            dense, expert = dense + n * d, expert + n * e
        s = memory.state_bytes(ctx, dense / mesh.pp, expert / mesh.pp)
        head = memory.state_bytes(ctx, memory.head_params_on_rank(ctx), 0.0)
        best = min(best, sum(s.values()) + sum(head.values()) + ctx.cal.reserve_gib * memory.GiB)
    return best


def time_floor(table: CostTable) -> float:
    """No bubble, no recompute, perfect balance: m * (sum of unit times + extras) / pp."""
    total = sum(u.time(0) for u in table.units) + table.first.time + table.last.time
    return table.microbatches * total / table.layout.pp


@lru_cache(maxsize=256)
def _type_counts(unit_types: tuple[int, ...]) -> dict[int, int]:
    return dict(Counter(unit_types))


def candidate_lower(table: CostTable, problem: PartitionProblem) -> float:
    """Perfect balance with each unit at its cheapest allowed option (memory ignored)."""
    counts_by_type = _type_counts(problem.unit_types)
    cheapest = [min(problem.time[t][o] for o in problem.options) for t in range(len(problem.time))]
    work = sum(n * cheapest[t] for t, n in counts_by_type.items())
    per_rank = (work + table.first.time + table.last.time
                + table.chunks * table.chunk_time) / table.layout.pp
    return table.schedule_factor * max(per_rank, max(cheapest))


def quick_estimate(cand: Candidate) -> None:
    """Even split, one recompute option everywhere: the lightest option that fits."""
    p = cand.problem
    sizes = even_sizes(len(p.unit_types), p.chunks)
    for o in p.options:
        totals = rank_totals(p, sizes, (o,) * p.chunks)
        if all(m <= p.capacity for _, m in totals):
            z = max(t for t, _ in totals)
            cand.quick = cand.table.schedule_factor * z + sync_estimate(cand.table, z)
            cand.quick_option = o
            return


def sync_estimate(table: CostTable, z: float) -> float:
    """Exposed DP synchronisation + optimizer step of an average rank whose micro-batch takes z
    seconds (about a third forward, two thirds backward)."""
    units_ = table.units
    dense = (sum(u.dense_params for u in units_) + table.first.params + table.last.params)
    expert = sum(u.expert_params for u in units_)
    pp = table.layout.pp
    rc = RankCost(time=z, fwd=z / 3, dense_params=dense / pp, expert_params=expert / pp,
                  activations=0.0, transient=0.0, comm={})
    exposed, opt = sync_time(table, rc)
    return exposed + opt


# ------------------------------------------------------------------------------------------------
# The search
# ------------------------------------------------------------------------------------------------

def search(job: TrainJob, extra_pins: Optional[dict] = None, top: int = 5,
           max_solves: Optional[int] = None, max_nodes: Optional[int] = None,
           progress: Optional[Callable[[int, int], None]] = None,
           compare_unfolded: bool = True, runnable_only: bool = False) -> SearchResult:
    """Best plans for ``job`` (at most ``top``), the rejected families and the search counts.
    For a MoE model whose winner is folded, ``compare_unfolded`` also finds the best unfolded plan
    and says what folding gains over it. ``runnable_only`` (`plait run`, `plait plan`): offer only
    plans plait's runtime can execute and name the better legal ones it cannot (result.blocked);
    else (the planner as Megatron's planner) rank every legal plan."""
    start = _time.perf_counter()
    pins = job_pins(job, extra_pins)
    check_pins(job, pins)
    options = (OPTIONS.index(pins["recompute"]),) if "recompute" in pins else (0, 1, 2)
    kinds = (pins["dp_kind"],) if "dp_kind" in pins else DEFAULT_KINDS
    result = SearchResult(plans=[], rejections=[], runnable_only=runnable_only)
    families = explain.Families(job)
    plans, ordered, blocked = _plans(job, pins, kinds, options, (top, max_solves, max_nodes),
                                     result, families, progress)
    result.blocked = runnable.better_blocked(
        blocked, plans[0].prediction.step_time if plans else INF,
        lambda cand: _solve_one(cand, max_nodes)[0])
    if plans:
        winner = plans[0]
        if job.model.is_moe and compare_unfolded:
            _compare_unfolded(job, pins, kinds, options, max_nodes, plans, ordered, families,
                              result)
        prints = fingerprints(job)
        result.plans = [replace(p, fingerprints=prints, explanation=tuple(
            explain.why(job, p, plans, families)
            + ([result.folding] if p is winner and result.folding else [])
            + (runnable.winner_lines(result.blocked, p) if p is winner else [])))
            for p in plans[:top]]
        result.rejections = families.rejections(winner)
    else:
        result.min_memory = families.smallest_need()
    result.seconds = _time.perf_counter() - start
    return result


def _plans(job, pins, kinds, options, limits, result, families, progress=None,
           ordered: Optional[list] = None) -> tuple[list[ParallelPlan], list, list]:
    """Enumerate -> bound -> expand -> solve; ``ordered`` (screened meshes, best first) skips the
    first two. -> (plans best first, the screened meshes, the blocked candidates left unsolved).
    ``limits`` = (top, max_solves, max_nodes)."""
    top, max_solves, max_nodes = limits
    if ordered is None:
        ordered = _bounded_meshes(job, pins, kinds, options, families, result)
    candidates = _expand(job, pins, kinds, options, ordered, top, result, progress, families)
    blocked = [c for c in candidates if c.blocked]
    for cand in blocked:
        families.blocked(cand.layout, cand.blocked)
    plans = _solve([c for c in candidates if not c.blocked], top, max_solves, max_nodes, families,
                   result)
    plans.sort(key=lambda p: (p.prediction.step_time, p.layout.short(), p.layout.dp_kind))
    return plans, ordered, blocked


UNFOLDED_SOLVES = 3  # ILPs for the best-unfolded comparison (its top-1 only)


def _compare_unfolded(job, pins, kinds, options, max_nodes, plans, ordered, families,
                      result) -> None:
    """The best unfolded plan: among the plans already solved when one is unfolded (the
    branch and bound solved every layout that could beat them), else from the search's screened
    meshes restricted to unfolded ones. Fills result.unfolded and result.folding."""
    winner = plans[0]
    if folding.is_unfolded(winner.layout):
        result.folding = folding.gain_line(job, winner, None, [])
        return
    solved = [p for p in plans if folding.is_unfolded(p.layout)]
    sub = SearchResult(plans=[], rejections=[], runnable_only=result.runnable_only,
                       why_blocked=result.why_blocked)
    unfolded = [o for o in ordered if folding.is_unfolded(o[2])]
    if not solved:
        solved, _, _ = _plans(job, pins, kinds, options, (1, UNFOLDED_SOLVES, max_nodes), sub,
                              explain.Families(job), ordered=unfolded)
    alt = solved[0] if solved else None
    needs = [r.need for r in families.records.values()
             if folding.is_unfolded(r.layout) and r.need < INF]
    reasons = explain.differences(job, winner, alt) if alt else []
    result.unfolded = alt
    result.folding = folding.gain_line(job, winner, alt, reasons, min(needs, default=None),
                                       any_legal=bool(unfolded or needs))
    result.pruned, result.solved = result.pruned + sub.pruned, result.solved + sub.solved


def _bounded_meshes(job, pins, kinds, options, families, result) -> list:
    """Meshes that can fit, each screened with one table (smallest micro-batch, first allowed DP
    flavour): (screen estimate, time floor, mesh, variants), best screen first."""
    capacity = job.cluster.device.memory
    unit_kinds = units(job.model)
    scored = []
    for mesh in meshes(job, pins):
        need = memory_floor(job, mesh, kinds)
        variants = [v for v in knob_variants(job, mesh, pins) if v.dp_kind in kinds]
        result.enumerated += len(variants)
        if not variants:
            continue
        if result.runnable_only:
            result.why_blocked.update((v, b) for v, b in zip(variants, blockers(job, mesh, variants))
                                      if b)
        if need > capacity:
            families.out_of_memory(mesh, need)
            result.pruned += len(variants)
            continue
        kind = "zero1" if "zero1" in kinds else kinds[0]
        screen = floor = INF
        for mbs in sorted({min(v.mbs for v in variants), max(v.mbs for v in variants)}):
            table = CostTable(job, replace(mesh, mbs=mbs, dp_kind=kind, vpp=1), unit_kinds)
            problem = problem_of(table, options)
            for vpp in sorted({v.vpp for v in variants}):
                cand = _candidate(replace(table.layout, vpp=vpp), table, problem)
                screen = min(screen, cand.quick)
            # the largest micro-batch has the fewest per-micro-batch costs: its floor bounds all
            floor = min(floor, time_floor(table))
        scored.append((screen, floor, mesh.short(), mesh, variants))
    scored.sort(key=lambda s: (s[0], s[1], s[2]))
    return [(sc, fl, m, v) for sc, fl, _, m, v in scored]


def _candidate(lay: Layout, base: CostTable, base_problem: PartitionProblem) -> Candidate:
    table = base.with_vpp(lay.vpp) if lay.vpp != base.layout.vpp else base
    problem = base_problem if lay.vpp == base_problem.vpp else replace(
        base_problem, vpp=lay.vpp, inflight=tuple(table.inflight(r) for r in range(lay.pp)))
    cand = Candidate(layout=lay, table=table, problem=problem,
                     lower=candidate_lower(table, problem))
    quick_estimate(cand)
    return cand


# Screening keeps the meshes whose even-split estimate is within this factor of the best one
# (at least MIN_MESHES of them); their floors must also beat the k-th best estimate so far.
SCREEN_SLACK, MIN_MESHES = 1.10, 8


def _expand(job, pins, kinds, options, ordered, top, result, progress, families) -> list[Candidate]:
    """Every knob variant of the meshes that survive screening and the floor bound. Screening and
    the k-th best estimate count runnable candidates only (blocked ones are kept to compare)."""
    unit_kinds = units(job.model)
    cands: list[Candidate] = []
    best_quick: list[float] = []  # max-heap (negated) of the k best runnable estimates so far
    why = result.why_blocked
    runs = [any(v not in why for v in o[3]) for o in ordered]  # the mesh has a runnable variant
    best_screen = next((o[0] for o, r in zip(ordered, runs) if r), INF)
    seen = 0  # runnable meshes screened so far
    for i, (screen, floor, mesh, variants) in enumerate(ordered):
        if progress:
            progress(i + 1, len(ordered))
        kth = -best_quick[0] if len(best_quick) >= top else INF
        if (seen >= MIN_MESHES and screen > SCREEN_SLACK * best_screen) or floor > kth:
            result.pruned += len(variants)
            families.screened(mesh, screen, floor)
            continue
        seen += runs[i]
        tables: dict = {}
        for lay in variants:
            key = (lay.mbs, lay.dp_kind)
            if key not in tables:
                base = CostTable(job, replace(lay, vpp=1), unit_kinds)
                tables[key] = (base, problem_of(base, options))
            cand = _candidate(lay, *tables[key])
            cand.blocked = why.get(lay)
            if cand.quick < INF and not cand.blocked:
                heapq.heappush(best_quick, -cand.quick)
                if len(best_quick) > top:
                    heapq.heappop(best_quick)
            cands.append(cand)
    return cands


MAX_ILP_SOLVES = 4  # general-formulation ILPs per search (each bounded by ilp.MAX_NODES nodes)


def _solve(cands, top, max_solves, max_nodes, families, result) -> list[ParallelPlan]:
    """Exact partitions in order of the even-split estimate (an upper bound of each), skipping
    candidates whose lower bound cannot beat the k-th best plan or estimate (branch and bound).
    ``max_solves`` caps the solves (None: every candidate the bound keeps); ILPs (heterogeneous
    units with vpp > 1) are capped at MAX_ILP_SOLVES."""
    plans: list[ParallelPlan] = []
    best_quick = sorted(c.quick for c in cands)
    ilps = 0
    for cand in sorted(cands, key=lambda c: c.key):
        steps = sorted(p.prediction.step_time for p in plans)
        bound = min(steps[top - 1] if len(steps) >= top else INF,
                    best_quick[top - 1] if len(best_quick) >= top else INF)
        needs_ilp = not cand.problem.tied and cand.problem.vpp > 1
        if (cand.lower > bound or (max_solves is not None and result.solved >= max_solves)
                or (needs_ilp and ilps >= MAX_ILP_SOLVES)):
            result.pruned += 1
            families.estimated(cand)
            continue
        plan, solved = _solve_one(cand, max_nodes)
        result.solved += solved
        ilps += solved and needs_ilp
        if plan is None:
            families.infeasible(cand)
            continue
        families.solved(cand, plan)
        plans.append(plan)
    return plans


def _solve_one(cand: Candidate, max_nodes: Optional[int]) -> tuple[Optional[ParallelPlan], bool]:
    """The candidate's exact partition as a plan (None: nothing fits) and whether a solver ran
    (an even split that meets the lower bound needs none)."""
    start = None
    if cand.quick < INF:
        start = (even_sizes(len(cand.problem.unit_types), cand.problem.chunks),
                 (cand.quick_option,) * cand.problem.chunks)
    solved = not cand.quick <= cand.lower * (1 + 1e-9)
    if not solved:  # the even split meets the lower bound
        part = Partition(sizes=start[0], options=start[1], z=0.0, status=OPTIMAL,
                         method="even split meets the lower bound")
    else:
        part = solve(cand.problem, start=start, max_nodes=max_nodes)
    if part is None:
        return None, solved
    return make_plan(cand.table, part.sizes, part.options, optimality=optimality_of(part)), solved


def optimality_of(part: Partition) -> Optimality:
    return Optimality(proven=part.status == OPTIMAL, gap=part.gap, method=part.method,
                      nodes=part.nodes)


def estimate(job: TrainJob, layout_pins: dict, runnable_only: bool = False) -> ParallelPlan:
    """The best plan with ``layout_pins`` fixed (searching only what they leave open)."""
    res = search(job, layout_pins, top=3, runnable_only=runnable_only)
    if res.best is None:
        raise LayoutError(explain.no_feasible(job, res))
    return res.best
