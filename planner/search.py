"""The planner's driver: enumerate -> prune by bounds -> solve -> rank -> explain.

1. Enumerate meshes (tp, cp, pp | etp, ep) the rules and pins allow.
2. Per mesh (planner/bounds.py): a memory floor (FSDP-sharded state alone, full recompute) that
   rejects meshes which can never fit, and a screening estimate (even split) that orders them.
3. Best-first over meshes: expand (mbs, dp flavour, vpp) and estimate each candidate with an even
   split at the lightest recompute that fits; a mesh is dropped unexpanded only when its proven
   floor (every micro-batch and vpp it takes, no recompute, perfect balance) exceeds the k-th
   best even-split step evaluated so far (plans that exist), never by how its estimate compares.
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
import time as _time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from plait.ir.errors import LayoutError
from plait.ir.job import TrainJob
from plait.ir.plan import Layout, Optimality, ParallelPlan

from . import explain, folding, runnable
from .bounds import (Candidate, can_reach, costed, floor_kinds, make_candidate, may_fit, mesh_floor,
                     quick_estimate, screened_meshes, upper)
from .fingerprint import fingerprints
from .cost.evaluate import evaluate
from .cost.pipeline import OPTIONS, CostTable, stages_of
from .partition import OPTIMAL, TOL, Partition, lower_bound, solve
from .layouts import check_pins, job_pins, units

INF = float("inf")
DEFAULT_KINDS = ("zero1", "fsdp")  # "replicated" moves the same bytes as zero1 and holds more


@dataclass
class SearchResult:
    plans: list[ParallelPlan]
    rejections: list[explain.Rejection]
    enumerated: int = 0  # layouts (mesh x mbs x dp flavour x vpp) considered
    pruned: int = 0  # dropped by a bound without solving
    solved: int = 0  # ILPs solved
    capped: int = 0  # candidates no bound ruled out that a solve cap left unsolved: while > 0
    # the winner is the best of what was solved, not proven the best layout
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
        ordered = screened_meshes(job, pins, kinds, options, families, result)
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
    unfolded = [o for o in ordered if folding.is_unfolded(o.mesh)]
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


def _expand(job, pins, kinds, options, ordered, top, result, progress, families) -> list[Candidate]:
    """The knob variants whose proven floor does not exceed the k-th best plan that exists so
    far (bounds.upper of the runnable candidates; blocked ones are kept to compare), a mesh at a
    time, the whole mesh dropped when its floor exceeds it."""
    unit_kinds = units(job.model)
    cands: list[Candidate] = []
    best_upper: list[float] = []  # max-heap (negated) of the k least runnable upper bounds so far
    why = result.why_blocked
    for i, (screen, floor, mesh, variants, screened) in enumerate(ordered):
        if progress:
            progress(i + 1, len(ordered))
        kth = -best_upper[0] if len(best_upper) >= top else INF
        tables = dict(screened)
        if floor > kth:  # the screened micro-batches cannot win: are the others any better?
            _floor_tables(job, kinds, options, variants, tables)
            floor = mesh_floor(tables, variants, kinds)
        kept, floors = 0, {}
        for lay in variants:
            if floor > kth or (kth < INF and _floor(job, kinds, options, lay, tables, floors) > kth):
                result.pruned += 1
                continue
            cand = make_candidate(lay, _table(job, options, lay, tables, unit_kinds), False)
            if kth < INF and (cand.lower > kth or not can_reach(cand, kth)):
                result.pruned += 1
                continue
            quick_estimate(cand)
            cand.blocked = why.get(lay)
            if cand.quick < INF and not cand.blocked and cand.lower <= kth:
                heapq.heappush(best_upper, -upper(cand))
                if len(best_upper) > top:
                    heapq.heappop(best_upper)
                kth = -best_upper[0] if len(best_upper) >= top else INF
            cands.append(cand)
            kept += 1
        if not kept:
            families.screened(mesh, screen, floor)
    return cands


def _floor(job, kinds, options, lay, tables: dict, floors: dict) -> float:
    """bounds.mesh_floor of one variant: no DP flavour at its mbs and vpp does better (cached in
    ``floors`` by (mbs, vpp))."""
    key = (lay.mbs, lay.vpp)
    if key not in floors:
        _floor_tables(job, kinds, options, [lay], tables)
        floors[key] = mesh_floor(tables, [lay], kinds)
    return floors[key]


def _table(job, options, lay, tables: dict, unit_kinds):
    """The bounds.Costed of ``lay``'s micro-batch and DP flavour, cached in ``tables``."""
    key = (lay.mbs, lay.dp_kind)
    if key not in tables:
        tables[key] = costed(job, lay, options, unit_kinds)
    return tables[key]


def _floor_tables(job, kinds, options, variants, tables: dict) -> None:
    """Adds to ``tables`` the Costed of every mbs under each of bounds.floor_kinds."""
    unit_kinds = units(job.model)
    for v in variants:
        for kind in floor_kinds(kinds):
            if (v.mbs, kind) not in tables:
                _table(job, options, replace(v, dp_kind=kind), tables, unit_kinds)


MAX_ILP_SOLVES = 4  # general-formulation ILPs per search (each bounded by ilp.MAX_NODES nodes)


def _solve(cands, top, max_solves, max_nodes, families, result) -> list[ParallelPlan]:
    """Exact partitions in order of the even-split estimate, skipping candidates whose lower bound
    cannot beat the k-th best plan solved or known to exist (bounds.upper; branch and bound).
    ``max_solves`` caps the solves (None: every candidate the bound keeps); ILPs (heterogeneous
    units with vpp > 1) are capped at MAX_ILP_SOLVES."""
    plans: list[ParallelPlan] = []
    uppers = sorted(c.upper for c in cands)
    best_steps: list[float] = []  # max-heap (negated) of the k least solved step times
    ilps = 0
    for cand in sorted(cands, key=lambda c: c.key):
        bound = min(-best_steps[0] if len(best_steps) >= top else INF,
                    uppers[top - 1] if len(uppers) >= top else INF)
        needs_ilp = not cand.problem.tied and cand.problem.vpp > 1
        if cand.lower > bound or not can_reach(cand, bound):
            result.pruned += 1
            families.estimated(cand)
            continue
        if ((max_solves is not None and result.solved >= max_solves)
                or (needs_ilp and ilps >= MAX_ILP_SOLVES)):  # a cap, not a bound, drops it
            result.pruned += 1
            result.capped += 1
            families.estimated(cand)
            continue
        if cand.quick == INF and not may_fit(cand.problem):
            result.pruned += 1
            families.infeasible(cand)
            continue
        plan, solved = _solve_one(cand, max_nodes)
        result.solved += solved
        ilps += solved and needs_ilp
        if plan is None:
            families.infeasible(cand)
            continue
        families.solved(cand, plan)
        plans.append(plan)
        heapq.heappush(best_steps, -plan.prediction.step_time)
        if len(best_steps) > top:
            heapq.heappop(best_steps)
    return plans


def _solve_one(cand: Candidate, max_nodes: Optional[int]) -> tuple[Optional[ParallelPlan], bool]:
    """The candidate's exact partition as a plan (None: nothing fits) and whether a solver ran
    (an even split that meets the lower bound on z needs none). The partition minimises z; its
    step also counts the DP sync of its busiest rank, so when the even split steps faster the
    even split is returned: a candidate's plan never steps slower than bounds.upper says."""
    even = cand.even_split
    if even is not None and cand.quick_z <= lower_bound(cand.problem) * (1 + TOL):
        part = Partition(sizes=even[0], options=even[1], z=cand.quick_z, status=OPTIMAL,
                         method="even split meets the lower bound")
        return make_plan(cand.table, *even, optimality=optimality_of(part)), False
    part = solve(cand.problem, start=even, max_nodes=max_nodes)
    if part is None:
        return None, True
    plan = make_plan(cand.table, part.sizes, part.options, optimality=optimality_of(part))
    if even is not None and upper(cand) < plan.prediction.step_time:
        plan = make_plan(cand.table, *even, optimality=Optimality(
            proven=False, gap=max(0.0, 1 - part.bound / cand.quick_z), method=(
                f"even split: steps faster than the least-z partition ({part.method})")))
    return plan, True


def optimality_of(part: Partition) -> Optimality:
    return Optimality(proven=part.status == OPTIMAL, gap=part.gap, method=part.method,
                      nodes=part.nodes)


def estimate(job: TrainJob, layout_pins: dict, runnable_only: bool = False) -> ParallelPlan:
    """The best plan with ``layout_pins`` fixed (searching only what they leave open)."""
    res = search(job, layout_pins, top=3, runnable_only=runnable_only)
    if res.best is None:
        raise LayoutError(explain.no_feasible(job, res))
    return res.best
