"""Stage partition, heterogeneous units (hybrid patterns).

vpp = 1: a dynamic program over chunks and prefix lengths (Alpa's stage-partition DP with
per-chunk memory feasibility), exact. vpp > 1: a rank's memory sums chunks far apart in the model;
a balanced partition (the same DP with each chunk held to 1/vpp of its rank) improved by local
moves, its gap to partition.lower_bound stated, and the ILP (ilp.py) where that finds nothing.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from .partition import (FEASIBLE, OPTIMAL, TOL, Partition, PartitionProblem, lower_bound,
                        partition_fits, partition_time, rank_totals)


# ------------------------------------------------------------------------------------------------

def _prefix(values) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=float))])


def _chunk_costs(p: PartitionProblem, slots):
    """Per chunk: (time[o, s, u], fits[o, s, u]) of units [s, u) under option o. ``slots`` gives
    each chunk's (rank, fixed seconds, byte limit for its units and transient)."""
    types = p.unit_types
    grow = 1 + p.fragmentation
    pt = {o: _prefix([p.time[t][o] for t in types]) for o in p.options}
    pa = {o: _prefix([p.act[t][o] for t in types]) for o in p.options}
    ps = _prefix([p.static[t] for t in types])
    span = lambda a: a[None, :] - a[:, None]  # [s, u] = a[u] - a[s]
    out = []
    for rank, fixed, limit in slots:
        times, fits = [], []
        for o in p.options:
            mem = span(ps) + grow * p.inflight[rank] * span(pa[o]) + grow * p.option_transient(o)
            times.append(span(pt[o]) + fixed)
            fits.append(mem <= limit)
        out.append((np.array(times), np.array(fits)))
    return out


def _least_max_chain(costs, U: int) -> float:
    """Least over partitions into len(costs) chunks of the largest chunk time (inf: none fits)."""
    order = np.arange(U + 1)
    nonempty = order[:, None] < order[None, :]  # [s, u]: s < u
    best = np.full(U + 1, np.inf)
    best[0] = 0.0
    for time, fits in costs:
        cand = np.where(fits & nonempty, np.maximum(best[None, :, None], time), np.inf)
        best = cand.min(axis=(0, 1))
    return float(best[U])


def solve_chain(p: PartitionProblem) -> Partition | None:
    """vpp = 1: chunk c is rank c, so a rank's time and memory are its chunk's (exact DP)."""
    U = len(p.unit_types)
    cap = p.capacity * (1 + TOL)
    slots = [(c, p.rank_base(c)[0], cap - p.rank_base(c)[1]) for c in range(p.chunks)]
    costs = _chunk_costs(p, slots)
    z_star = _least_max_chain(costs, U)
    if not np.isfinite(z_star):
        return None
    sizes, options = _least_total_chain(costs, U, z_star * (1 + TOL), p.options)
    z = partition_time(p, sizes, options)
    return Partition(sizes=sizes, options=options, z=z, status=OPTIMAL, bound=z, method="chain")


def _least_total_chain(costs, U: int, z: float, allowed: tuple[int, ...]):
    """Chunks of least total time with every chunk within z (exact DP, argmin ties to the
    earliest boundary and lightest option)."""
    order = np.arange(U + 1)
    nonempty = order[:, None] < order[None, :]
    acc = np.full(U + 1, np.inf)
    acc[0] = 0.0
    back = []
    for time, fits in costs:
        ok = fits & nonempty & (time <= z)
        cand = np.where(ok, acc[None, :, None] + time, np.inf)  # [o, s, u]
        flat = cand.reshape(-1, U + 1)
        arg = np.argmin(flat, axis=0)
        acc = flat[arg, order]
        back.append(arg)
    sizes, options, u = [], [], U
    for arg in reversed(back):
        i, s = divmod(int(arg[u]), U + 1)
        sizes.append(u - s)
        options.append(allowed[i])
        u = s
    return tuple(reversed(sizes)), tuple(reversed(options))


# ------------------------------------------------------------------------------------------------
# Interleaved heterogeneous: a rank's chunks lie far apart in the model
# ------------------------------------------------------------------------------------------------

def interleaved_start(p: PartitionProblem) -> tuple | None:
    """A partition that fits, balanced chunk by chunk: the chain DP over all C chunks, chunk c
    held to 1/vpp of rank c mod pp's memory and carrying 1/vpp of its fixed time; then local
    moves of one boundary or one option while the busiest rank gets faster."""
    U = len(p.unit_types)
    cap = p.capacity * (1 + TOL)
    slots = []
    for c in range(p.chunks):
        bt, bm = p.rank_base(p.rank_of(c))
        slots.append((p.rank_of(c), bt / p.vpp, (cap - bm) / p.vpp))
    costs = _chunk_costs(p, slots)
    z = _least_max_chain(costs, U)
    if not np.isfinite(z):
        return None
    start = _least_total_chain(costs, U, z * (1 + TOL), p.options)
    return improve(p, *start)


def _score(p: PartitionProblem, sizes, options):
    totals = rank_totals(p, sizes, options)
    if any(m > p.capacity * (1 + TOL) for _, m in totals):
        return None
    times = sorted((t for t, _ in totals), reverse=True)
    return tuple(times)  # the busiest rank first, then the next: lexicographic


def improve(p: PartitionProblem, sizes, options, rounds: int = 64) -> tuple:
    """Deterministic first-improvement local search: shift one boundary by one unit or change one
    chunk's option while the sorted rank times decrease lexicographically (at most ``rounds``
    passes: a work limit, not a clock)."""
    sizes, options = list(sizes), list(options)
    best = _score(p, sizes, options)
    for _ in range(rounds):
        improved = False
        for trial in _moves(p, sizes, options):
            score = _score(p, *trial)
            if score is not None and score < best:
                best, (sizes, options), improved = score, (list(trial[0]), list(trial[1])), True
        if not improved:
            break
    return tuple(sizes), tuple(options)


def _moves(p: PartitionProblem, sizes: list, options: list):
    for b in range(len(sizes) - 1):  # boundary after chunk b
        for d in (-1, 1):
            s = list(sizes)
            s[b], s[b + 1] = s[b] + d, s[b + 1] - d
            if min(s[b], s[b + 1]) >= 1:
                yield s, options
    for c in range(len(options)):
        for o in p.options:
            if o != options[c]:
                yield sizes, options[:c] + [o] + options[c + 1:]


def _window_around(p: PartitionProblem, seed) -> PartitionProblem:
    """The problem with the ILP's boundary window wide enough to hold ``seed``."""
    if seed is None:
        return p
    U, C = len(p.unit_types), p.chunks
    ends = np.cumsum(seed[0])[:-1]
    shift = max((abs(e - (c + 1) * U / C) for c, e in enumerate(ends)), default=0)
    auto = max(2, -(-U // (2 * C)))
    return replace(p, window=max(p.window or auto, int(np.ceil(shift)) + 1))


def solve_interleaved(p: PartitionProblem, start: tuple | None = None,
                      max_nodes: int | None = None) -> Partition | None:
    """Heterogeneous units, vpp > 1: the balanced start above (or ``start`` when better),
    polished by the ILP when ``max_nodes`` > 0 (measured on Nemotron-H 56B: 100-400 HiGHS nodes
    cost 12-60 s and never improved the start, so by default only when the balanced split finds
    no partition that fits: memory is tight, the ILP decides). Proven when the ILP
    proves it or the lower bound meets it, else FEASIBLE with the gap to the bound."""
    seeds = [s for s in (interleaved_start(p), start) if s is not None and partition_fits(p, *s)]
    seed = min(seeds, key=lambda s: (partition_time(p, *s), s)) if seeds else None
    bound, nodes, method = lower_bound(p), 0, "interleaved balance"
    if seed is None and max_nodes is None:  # the balanced split is too cautious: ask the ILP
        from .ilp import MAX_NODES
        max_nodes = MAX_NODES
    if max_nodes:
        from . import ilp  # the only module that imports pulp
        part = ilp.solve(_window_around(p, seed), start=seed, max_nodes=max_nodes)
        if part is not None:
            if part.status == OPTIMAL:
                return part
            seed, bound, nodes, method = (part.sizes, part.options), max(bound, part.bound), \
                part.nodes, "ilp"
    if seed is None:
        return None
    z = partition_time(p, *seed)
    proven = bound >= z * (1 - TOL)
    return Partition(tuple(seed[0]), tuple(seed[1]), z, OPTIMAL if proven else FEASIBLE,
                     z if proven else bound, method, nodes)
