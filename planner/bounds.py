"""The search's bounds: what a candidate or a whole mesh can at best reach, and plans it surely
reaches, so that planner/search.py drops a mesh or a candidate only when it provably cannot beat
the k-th best plan.

Step time (planner/cost/pipeline.py) = (m + (pp - 1) / vpp) * z + exposed DP sync + optimizer
step + world reductions, with z the busiest rank's seconds per micro-batch. Lower bounds:

  * candidate_lower: z at perfect balance with every unit at its cheapest recompute option and
    memory ignored, times the schedule factor, plus an average rank's optimizer step (the busiest
    rank's is no less) and the world reductions; exposed DP sync counted as zero.
  * mesh_floor: the least candidate_lower over every micro-batch size and virtual-pipeline size a
    mesh's variants take, costed under the DP flavours that bound the others (floor_kinds).

Upper bounds are plans that exist: ``upper`` is the evaluated step of a candidate's even split at
the lightest recompute that fits (search._solve_one never returns a worse plan for it).
``quick`` (the same even split with an average rank's sync) only orders candidates and meshes.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import NamedTuple, Optional

from plait.ir.job import TrainJob
from plait.ir.legality import Violation
from plait.ir.plan import Layout

from .cost import comm, memory
from .cost.context import Context
from .cost.evaluate import RankCost, evaluate, sync_time
from .cost.pipeline import CostTable, even_sizes, stages_of
from .layouts import blockers, knob_variants, meshes, units
from .partition import TOL, PartitionProblem, rank_totals

INF = float("inf")


@dataclass
class Candidate:
    layout: Layout
    table: CostTable
    problem: PartitionProblem
    lower: float  # step-time lower bound
    quick: float = INF  # even split with the lightest recompute that fits (ordering only)
    quick_option: int = -1
    quick_z: float = INF  # that even split's busiest rank seconds per micro-batch
    blocked: Optional[Violation] = None  # the RUNNABLE row it breaks (runnable-only searches)
    upper: float = INF  # evaluated step of that even split, once asked for (bounds.upper)
    fixed: float = 0.0  # step seconds no partition avoids (fixed_seconds)

    @property
    def key(self) -> tuple:
        return (self.quick, self.lower, self.layout.short(), self.layout.dp_kind)

    @property
    def even_split(self) -> Optional[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(units per chunk, option per chunk) of the even split that fits, None when none fits."""
        if self.quick == INF:
            return None
        chunks = self.problem.chunks
        return even_sizes(len(self.problem.unit_types), chunks), (self.quick_option,) * chunks


def problem_of(table: CostTable, options: tuple[int, ...]) -> PartitionProblem:
    distinct = table.distinct_units
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


class Costed(NamedTuple):
    """One (mesh, mbs, DP flavour) at vpp 1: its cost table, partition problem, and the step
    seconds no partition avoids (bounds.fixed_seconds); its vpp variants share them."""

    table: CostTable
    problem: PartitionProblem
    fixed: float


def costed(job: TrainJob, lay: Layout, options: tuple[int, ...], unit_kinds) -> Costed:
    table = CostTable(job, replace(lay, vpp=1), unit_kinds)
    return Costed(table, problem_of(table, options), fixed_seconds(table))


def make_candidate(lay: Layout, base: Costed, estimate: bool = True) -> Candidate:
    """``lay`` (a variant of ``base``'s layout differing at most in vpp) bounded, and estimated
    unless ``estimate`` is False (then quick_estimate does it)."""
    table = base.table.with_vpp(lay.vpp) if lay.vpp != base.table.layout.vpp else base.table
    problem = base.problem if lay.vpp == base.problem.vpp else replace(
        base.problem, vpp=lay.vpp, inflight=tuple(table.inflight(r) for r in range(lay.pp)))
    cand = Candidate(layout=lay, table=table, problem=problem,
                     lower=candidate_lower(table, problem, base.fixed), fixed=base.fixed)
    if estimate:
        quick_estimate(cand)
    return cand


class Screened(NamedTuple):
    """A mesh that can fit, as screening left it (see screened_meshes)."""

    screen: float  # best even-split estimate over the screened tables
    floor: float  # mesh_floor over the screened micro-batches only
    mesh: Layout
    variants: list
    tables: dict  # (mbs, DP flavour) -> Costed, the screened ones


# ------------------------------------------------------------------------------------------------
# Lower bounds
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


@lru_cache(maxsize=256)
def _type_counts(unit_types: tuple[int, ...]) -> dict[int, int]:
    return dict(Counter(unit_types))


def candidate_lower(table: CostTable, problem: PartitionProblem, fixed: float) -> float:
    """Perfect balance with each unit at its cheapest allowed option (memory ignored), no exposed
    DP sync, plus ``fixed`` (fixed_seconds of the table): below every partition's step time under
    ``table``'s layout."""
    counts_by_type = _type_counts(problem.unit_types)
    cheapest = [min(problem.time[t][o] for o in problem.options) for t in range(len(problem.time))]
    work = sum(n * cheapest[t] for t, n in counts_by_type.items())
    per_rank = (work + table.first.time + table.last.time
                + table.chunks * table.chunk_time) / table.layout.pp
    return table.schedule_factor * max(per_rank, max(cheapest)) + fixed


def fixed_seconds(table: CostTable) -> float:
    """Step seconds no partition avoids: the world reductions and the optimizer step of an average
    pipeline rank (the step waits for the rank with the most parameters, which holds at least the
    average, and the optimizer's time is linear in them). Independent of vpp."""
    return sync_time(table, average_rank(table, 0.0))[1] + comm.step_reductions(table.ctx)


def may_fit(p: PartitionProblem) -> bool:
    """False only when no partition can fit: each rank r holds its fixed bytes, the least
    transient of any option, and at most floor(room / c_r) units, c_r the fewest bytes any unit
    adds to r under any option; together the ranks must hold every unit."""
    grow = 1 + p.fragmentation
    transient = grow * min(p.option_transient(o) for o in p.options)
    held = 0
    for r in range(p.pp):
        room = p.capacity * (1 + TOL) - p.rank_base(r)[1] - transient
        least = min(p.mem_coeff(t, o, r) for t in range(len(p.time)) for o in p.options)
        if room < 0:
            return False
        held += len(p.unit_types) if least <= 0 else math.floor(room / least)
    return held >= len(p.unit_types)


def average_rank(table: CostTable, z: float) -> RankCost:
    """A rank holding 1/pp of every parameter whose micro-batch takes z seconds (about a third
    forward, two thirds backward)."""
    units_ = table.units
    dense = (sum(u.dense_params for u in units_) + table.first.params + table.last.params)
    expert = sum(u.expert_params for u in units_)
    pp = table.layout.pp
    return RankCost(time=z, fwd=z / 3, dense_params=dense / pp, expert_params=expert / pp,
                    activations=0.0, transient=0.0, comm={})


def can_reach(cand: Candidate, step: float) -> bool:
    """False only when no partition of a candidate whose units are all alike steps in ``step``
    seconds or less: then every rank's busiest-time budget z = (step - fixed) / (schedule factor)
    caps the units it can hold, at best mixing recompute options fractionally within its time and
    memory (a linear program of two constraints: its optimum mixes at most two options), and
    together the ranks hold fewer units than the model has. Always True for mixed units."""
    p = cand.problem
    if not p.tied or step == INF:
        return True
    z = (step - cand.fixed) / cand.table.schedule_factor * (1 + TOL)
    transient = (1 + p.fragmentation) * min(p.option_transient(o) for o in p.options)
    held = 0.0
    for r in range(p.pp):
        base_time, base_mem = p.rank_base(r)
        room_t, room_m = z - base_time, p.capacity * (1 + TOL) - base_mem - transient
        if room_t < 0 or room_m < 0:
            return False
        held += _most_units(room_t, room_m, [(p.time[0][o], p.mem_coeff(0, o, r))
                                             for o in p.options])
    return held >= len(p.unit_types)


def _most_units(seconds: float, nbytes: float, options: list[tuple[float, float]]) -> float:
    """max sum(x) over x >= 0 with sum(x_o t_o) <= seconds and sum(x_o m_o) <= nbytes, for options
    (t_o, m_o): the best single option or the best pair with both constraints tight."""
    best = 0.0
    for t, m in options:
        best = max(best, min(seconds / t if t > 0 else INF, nbytes / m if m > 0 else INF))
    for i, (t1, m1) in enumerate(options):
        for t2, m2 in options[i + 1:]:
            det = t1 * m2 - t2 * m1
            if det == 0:
                continue
            x1 = (seconds * m2 - t2 * nbytes) / det
            x2 = (t1 * nbytes - seconds * m1) / det
            if x1 >= 0 and x2 >= 0:
                best = max(best, x1 + x2)
    return best


def floor_kinds(kinds: tuple[str, ...]) -> tuple[str, ...]:
    """The allowed DP flavours a mesh floor must cost. ZeRO-1 bounds the others: FSDP adds exposed
    traffic to each unit (pipeline.fsdp_exposed >= 0) and chunk (fsdp_edge) and shards the
    optimizer alike; replicated runs the same units and shards no optimizer state."""
    return ("zero1",) if "zero1" in kinds else kinds


def mesh_floor(tables: dict, variants: list[Layout], kinds: tuple[str, ...]) -> float:
    """A lower bound on every plan of a mesh whose variants are ``variants``: the least
    candidate_lower over their (mbs, vpp) pairs and floor_kinds. ``tables`` maps (mbs, DP
    flavour) to its Costed."""
    best = INF
    for mbs, vpp in {(v.mbs, v.vpp) for v in variants}:
        for kind in floor_kinds(kinds):
            base = tables[(mbs, kind)]
            best = min(best, candidate_lower(base.table.with_vpp(vpp), base.problem, base.fixed))
    return best


# ------------------------------------------------------------------------------------------------
# Estimates and plans that exist
# ------------------------------------------------------------------------------------------------

def quick_estimate(cand: Candidate) -> None:
    """Even split, one recompute option everywhere: the lightest option that fits."""
    p = cand.problem
    sizes = even_sizes(len(p.unit_types), p.chunks)
    for o in p.options:
        totals = rank_totals(p, sizes, (o,) * p.chunks)
        if all(m <= p.capacity for _, m in totals):
            z = max(t for t, _ in totals)
            cand.quick = cand.table.schedule_factor * z + sync_estimate(cand.table, z)
            cand.quick_option, cand.quick_z = o, z
            return


def sync_estimate(table: CostTable, z: float) -> float:
    """Exposed DP synchronisation + optimizer step of an average rank whose micro-batch takes z."""
    exposed, opt = sync_time(table, average_rank(table, z))
    return exposed + opt


def upper(cand: Candidate) -> float:
    """The evaluated step time of the candidate's even split (INF when none fits): a plan that
    exists, so the best plan of this candidate is at most this. Cached on the candidate."""
    split = cand.even_split
    if cand.upper == INF and split is not None:
        cand.upper = evaluate(cand.table, stages_of(cand.table, *split)).step_time
    return cand.upper


def screened_meshes(job: TrainJob, pins: dict, kinds: tuple[str, ...], options: tuple[int, ...],
                    families, result) -> list[Screened]:
    """Meshes that can fit, each screened with the tables of its smallest and largest micro-batch
    (floor_kinds, vpp 1), best screen first. The floor covers only the screened micro-batches
    (search._expand completes it where it would decide)."""
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
        screen, tables = INF, {}
        ends = {min(v.mbs for v in variants), max(v.mbs for v in variants)}
        for mbs in sorted(ends):
            for kind in floor_kinds(kinds):
                base = tables[(mbs, kind)] = costed(job, replace(mesh, mbs=mbs, dp_kind=kind),
                                                    options, unit_kinds)
                for vpp in sorted({v.vpp for v in variants}):
                    screen = min(screen, make_candidate(replace(base.table.layout, vpp=vpp),
                                                        base).quick)
        floor = mesh_floor(tables, [v for v in variants if v.mbs in ends], kinds)
        scored.append(Screened(screen, floor, mesh, variants, tables))
    scored.sort(key=lambda s: (s.screen, s.floor, s.mesh.short()))
    return scored
