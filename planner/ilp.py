"""The stage-partition ILP — the only module that imports pulp (and, through it, HiGHS).

``partition.py`` states the problem and solves the structured cases exactly without a solver; the
ILP covers heterogeneous units with vpp > 1, where a rank's memory sums chunks far apart in the
model. It runs in-process (HiGHS through PuLP, one thread), its work is bounded by a node count —
never by wall-clock time, so the same problem gives the same answer on an idle or a busy machine —
and it reports HiGHS's proven dual bound, so a partition that is not proven optimal carries its gap.

Two formulations:
  * tied (every unit identical): integer n[r,o] = units of rank r run with option o and
    k[r,o] = its chunks with option o. Kept as the independent cross-check of partition.solve_tied.
  * general (heterogeneous units): prefix binaries y[u,c] = [unit u sits in a chunk <= c], so
    contiguity is the monotonicity of y along u and c; restricted to a window around the even
    split; the first chunk's start and the last chunk's end are fixed (no symmetric duplicates).
A second pass minimises the total time with z capped at the first pass's value, as the exact
solvers do (no recompute where there is room).
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings

import numpy as np
import pulp

from .partition import (FEASIBLE, INF, OPTIMAL, Partition, PartitionProblem, even_split,
                        partition_fits, partition_time, rank_totals)

__all__ = ["solve", "PartitionProblem", "Partition", "OPTIMAL", "FEASIBLE", "partition_fits",
           "partition_time", "rank_totals", "MAX_NODES"]

MAX_NODES = 20000  # branch-and-bound nodes per solve: a deterministic work limit


@contextlib.contextmanager
def _quiet_stdout():
    """HiGHS prints its banner from C++ on the first Highs() of a process, before any option can
    turn output off: keep it out of plait's own output."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class _HiGHS(pulp.HiGHS):
    """PuLP's in-process HiGHS plus a MIP start from the variables' initial values."""

    def createAndConfigureSolver(self, lp):
        with _quiet_stdout():
            super().createAndConfigureSolver(lp)

    def callSolver(self, lp):
        # a partial start (the integer variables): HiGHS completes the continuous ones itself
        start = [(v.index, float(v.varValue)) for v in lp.variables()
                 if v.varValue is not None and v.cat == pulp.LpInteger]
        if start:
            index, value = zip(*start)
            lp.solverModel.setSolution(len(index), np.array(index, dtype=np.int32),
                                       np.array(value, dtype=np.float64))
        lp.solverModel.run()

    def findSolutionValues(self, lp):
        # PuLP 3.3 knows HiGHS's time and iteration limits but not the node limit (kSolutionLimit):
        # read it like an iteration limit (incumbent if there is one)
        import highspy
        model = lp.solverModel
        if model.getModelStatus() != highspy.HighsModelStatus.kSolutionLimit:
            return super().findSolutionValues(lp)
        lp.solverModel = _StatusAs(model, highspy.HighsModelStatus.kIterationLimit)
        try:
            return super().findSolutionValues(lp)
        finally:
            lp.solverModel = model


class _StatusAs:
    """A Highs object that reports another model status."""

    def __init__(self, model, status):
        self._model, self._status = model, status

    def getModelStatus(self):
        return self._status

    def __getattr__(self, name):
        return getattr(self._model, name)


def _run(prob, max_nodes: int) -> tuple[str | None, float, int]:
    """Solve; -> (status or None when infeasible / no incumbent, proven bound, nodes)."""
    solver = _HiGHS(msg=False, threads=1, mip_max_nodes=int(max_nodes), random_seed=0)
    with warnings.catch_warnings():  # PuLP 3.3 announces API changes for 4.0 on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        prob.solve(solver)
    info = prob.solverModel.getInfo()
    nodes = int(info.mip_node_count)
    if prob.sol_status == pulp.LpSolutionOptimal:
        return OPTIMAL, float(info.mip_dual_bound), nodes
    if prob.sol_status == pulp.LpSolutionIntegerFeasible:
        return FEASIBLE, float(info.mip_dual_bound), nodes
    return None, INF, nodes


def solve(problem: PartitionProblem, start: tuple | None = None, max_nodes: int | None = None,
          formulation: str | None = None) -> Partition | None:
    """Least-z partition by ILP, or None when no partition fits (or the node limit ends the
    search before any partition is found and ``start`` gives none). ``start`` = (sizes, options)
    of a partition known to fit. ``formulation``: "tied" or "general" (default: by structure)."""
    p = problem
    if len(p.unit_types) < p.chunks:
        return None
    max_nodes = MAX_NODES if max_nodes is None else max_nodes
    tied = p.tied if formulation is None else formulation == "tied"
    build = _tied_model if tied else _general_model
    prob, z, read, total = build(p, start)
    status, bound, nodes = _run(prob, max_nodes)
    if status is None:
        return _from_start(p, start, nodes)
    sizes, options = read()
    z_found = partition_time(p, sizes, options)
    # second pass: least total time at that z (the incumbent is its start)
    prob.setObjective(total)
    prob += z <= z_found * (1 + 1e-9) + 1e-12
    second, _, more = _run(prob, max_nodes)
    if second is not None:
        s2, o2 = read()
        if partition_fits(p, s2, o2) and partition_time(p, s2, o2) <= z_found * (1 + 1e-9):
            sizes, options = s2, o2
    z_val = partition_time(p, sizes, options)
    if status == OPTIMAL:
        bound = z_val
    return Partition(sizes=sizes, options=options, z=z_val, status=status, bound=min(bound, z_val),
                     method="ilp", nodes=nodes + more)


def _from_start(p, start, nodes) -> Partition | None:
    if start is None or not partition_fits(p, *start):
        return None
    z = partition_time(p, *start)
    return Partition(sizes=tuple(start[0]), options=tuple(start[1]), z=z, status=FEASIBLE,
                     bound=0.0, method="ilp", nodes=nodes)


def _var(prob, name, low=None, up=None, cat="Continuous"):
    return prob.add_variable(name, low, up, cat=cat)


def _fits(prob, p: PartitionProblem, lhs) -> None:
    if p.capacity != INF:
        prob += lhs <= p.capacity


def _tied_model(p: PartitionProblem, start=None):
    """All units identical (type 0). Only per-rank totals matter, so the variables are per rank:
    k[r,o] of rank r's vpp chunks run option o and hold n[r,o] units; w[r,o] = [k[r,o] > 0]."""
    U, V = len(p.unit_types), p.vpp
    prob = pulp.LpProblem("stage_partition_tied", pulp.LpMinimize)
    z = _var(prob, "z", 0)
    prob += z  # minimise the busiest rank's time per micro-batch
    n, k, w = {}, {}, {}
    for r in range(p.pp):
        for o in p.options:
            n[r, o] = _var(prob, f"n_{r}_{o}", 0, U, cat="Integer")
            k[r, o] = _var(prob, f"k_{r}_{o}", 0, V, cat="Integer")
            w[r, o] = _var(prob, f"w_{r}_{o}", cat="Binary")
    trans = {r: _var(prob, f"trans_{r}", 0) for r in range(p.pp)}
    prob += pulp.lpSum(n.values()) == U  # every unit placed once
    times = []
    for r in range(p.pp):
        prob += pulp.lpSum(k[r, o] for o in p.options) == V  # each rank runs vpp chunks
        for o in p.options:
            prob += k[r, o] <= n[r, o]  # no empty chunk: a chunk holds at least one unit
            prob += n[r, o] <= U * k[r, o]  # units of option o live in chunks of option o
            prob += k[r, o] <= V * w[r, o]  # w marks an option the rank uses
            prob += trans[r] >= p.transient[0][o] * w[r, o]  # peak transient of the rank
        base_t, base_m = p.rank_base(r)
        # rank time: its units' forward + backward (with recompute) + fixed terms <= z
        t_r = pulp.lpSum(n[r, o] * p.time[0][o] for o in p.options) + base_t
        prob += t_r <= z
        times.append(t_r)
        # rank memory: static + (1+frag)(inflight * activations + transient + buffers) + reserve
        _fits(prob, p, pulp.lpSum(n[r, o] * p.mem_coeff(0, o, r) for o in p.options)
              + (1 + p.fragmentation) * trans[r] + base_m)

    def read():
        per_chunk: dict = {}
        for r in range(p.pp):
            chunks = []
            for o in p.options:
                kk, nn = int(round(k[r, o].value() or 0)), int(round(n[r, o].value() or 0))
                chunks += [(size, o) for size in even_split(nn, kk)]
            for v, chunk in enumerate(chunks):
                per_chunk[v * p.pp + r] = chunk
        order = [per_chunk[c] for c in range(p.chunks)]
        return tuple(s for s, _ in order), tuple(o for _, o in order)
    return prob, z, read, pulp.lpSum(times)


def _window(p: PartitionProblem) -> int:
    U, C = len(p.unit_types), p.chunks
    return p.window or max(2, -(-U // (2 * C)))


def _prefix_vars(prob, p: PartitionProblem) -> dict:
    """y[u,c] = [unit u sits in a chunk <= c]: a variable inside the window around the even
    split, a constant outside it (and for the last chunk, which ends the model)."""
    U, C = len(p.unit_types), p.chunks
    win = _window(p)
    y = {}
    for c in range(C):
        boundary = (c + 1) * U / C  # even split: chunks <= c end here
        for u in range(U):
            if c == C - 1 or u < boundary - win or u <= c:
                y[u, c] = 1  # surely placed in a chunk <= c (unit u <= c: chunks before hold >= 1)
            elif u >= boundary + win or U - u <= C - 1 - c:
                y[u, c] = 0  # the chunks after c need at least one unit each
            else:
                y[u, c] = _var(prob, f"y_{u}_{c}", cat="Binary")
    return y


def _general_model(p: PartitionProblem, start: tuple | None = None):
    """Heterogeneous units: prefix binaries y[u,c] with contiguity by monotonicity."""
    U, C = len(p.unit_types), p.chunks
    prob = pulp.LpProblem("stage_partition", pulp.LpMinimize)
    z = _var(prob, "z", 0)
    prob += z
    w = {(c, o): _var(prob, f"w_{c}_{o}", cat="Binary")  # chunk c runs option o
         for c in range(C) for o in p.options}
    y = _prefix_vars(prob, p)
    x = {(u, c): y[u, c] - (y[u, c - 1] if c else 0) for u in range(U) for c in range(C)}
    for c in range(C):
        for u in range(U):
            if u and not _fixed(y[u, c], y[u - 1, c]):
                prob += y[u, c] <= y[u - 1, c]  # chunk index never decreases along the model
            if c and not _fixed(y[u, c - 1], y[u, c]):
                prob += y[u, c - 1] <= y[u, c]  # "in a chunk <= c-1" implies "<= c"
        prob += pulp.lpSum(x[u, c] for u in range(U)) >= 1  # no empty chunk
        prob += pulp.lpSum(w[c, o] for o in p.options) == 1
    times = _chunk_constraints(prob, p, x, w, z)
    if start is not None:
        _warm_start(y, w, z, p, *start)

    def read():
        sizes = tuple(int(round(sum(_val(x[u, c]) for u in range(U)))) for c in range(C))
        options = tuple(max(p.options, key=lambda o: w[c, o].value() or 0) for c in range(C))
        return sizes, options
    return prob, z, read, pulp.lpSum(times)


def _chunk_constraints(prob, p: PartitionProblem, x, w, z) -> list:
    """Per chunk and option: time and memory switched on by w[c,o] (big-M); per rank: time <= z,
    memory <= capacity. Returns the ranks' time expressions."""
    U, C = len(p.unit_types), p.chunks
    win = _window(p)
    longest = min(U - C + 1, -(-U // C) + 2 * win)  # most units a chunk can hold in its window
    big_t = longest * max(max(t) for t in p.time)
    trans = {r: _var(prob, f"trans_{r}", 0) for r in range(p.pp)}
    tc, mc = {}, {}
    for c in range(C):
        r = p.rank_of(c)
        big_m = longest * max(p.mem_coeff(t, o, r) for o in p.options for t in set(p.unit_types))
        for o in p.options:
            # T[c,o] >= chunk time under option o, switched off (big-M) unless w[c,o] = 1
            tc[c, o] = _var(prob, f"T_{c}_{o}", 0)
            mc[c, o] = _var(prob, f"M_{c}_{o}", 0)
            prob += tc[c, o] >= pulp.lpSum(x[u, c] * p.time[t][o] for u, t in enumerate(
                p.unit_types)) - big_t * (1 - w[c, o])
            prob += mc[c, o] >= pulp.lpSum(x[u, c] * p.mem_coeff(t, o, r) for u, t in enumerate(
                p.unit_types)) - big_m * (1 - w[c, o])
            prob += trans[r] >= p.option_transient(o) * w[c, o]
    times = []
    for r in range(p.pp):
        base_t, base_m = p.rank_base(r)
        mine = [c for c in range(C) if p.rank_of(c) == r]
        t_r = pulp.lpSum(tc[c, o] for c in mine for o in p.options) + base_t
        prob += t_r <= z
        times.append(t_r)
        _fits(prob, p, pulp.lpSum(mc[c, o] for c in mine for o in p.options)
              + (1 + p.fragmentation) * trans[r] + base_m)
    return times


def _warm_start(y: dict, w: dict, z, p: PartitionProblem, sizes, options) -> None:
    chunk_of = []
    for c, size in enumerate(sizes):
        chunk_of += [c] * size
    for (u, c), var in y.items():
        if not isinstance(var, int):
            var.setInitialValue(1 if chunk_of[u] <= c else 0)
    for (c, o), var in w.items():
        var.setInitialValue(1 if options[c] == o else 0)


def _fixed(*terms) -> bool:
    return all(isinstance(t, int) for t in terms)


def _val(expr) -> float:
    return float(expr) if isinstance(expr, (int, float)) else float(pulp.value(expr) or 0)
