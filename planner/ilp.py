"""The stage-partition ILP — the only module that imports pulp.

For one mesh, split the unit sequence into C = pp * vpp contiguous chunks (chunk c runs on pipeline
rank c mod pp) and choose a recompute option per chunk, minimising the busiest rank's time per
micro-batch z (the step is (m + (pp-1)/vpp) * z plus terms the partition does not change), subject
to every rank's memory fitting the device.

Two formulations of the same problem:
  * tied (every unit identical — Llama, Mixtral, GPT): integer n[c,o] = units of chunk c run with
    option o. Repeated layers are one variable, so the model has C * options integers.
  * general (hybrid patterns): prefix binaries y[u,c] = [unit u sits in a chunk <= c], restricted
    to a window around the even split so the model stays small.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import pulp

OPTIMAL, FEASIBLE = "optimal", "feasible"  # FEASIBLE: time limit hit with an incumbent


@dataclass(frozen=True)
class PartitionProblem:
    unit_types: tuple[int, ...]  # type index of each unit, in model order
    time: tuple[tuple[float, ...], ...]  # [type][option] seconds per micro-batch (fwd + bwd)
    act: tuple[tuple[float, ...], ...]  # [type][option] bytes stored per in-flight micro-batch
    transient: tuple[tuple[float, ...], ...]  # [type][option] bytes alive during its backward
    static: tuple[float, ...]  # [type] weights + grads + optimizer bytes
    pp: int
    vpp: int
    inflight: tuple[float, ...]  # [rank] in-flight micro-batches at the peak
    buffers: tuple[float, ...]  # [rank] partition-independent buffer bytes
    chunk_time: float = 0.0  # seconds every chunk adds (pipeline send / receive)
    first_time: float = 0.0  # embedding on chunk 0
    first_static: float = 0.0
    last_time: float = 0.0  # head + loss on chunk C-1
    last_static: float = 0.0
    fragmentation: float = 0.0
    reserve: float = 0.0
    capacity: float = float("inf")
    options: tuple[int, ...] = (0, 1, 2)  # allowed recompute options
    window: int = 0  # general formulation: max shift of a boundary from the even split (0: auto)

    @property
    def chunks(self) -> int:
        return self.pp * self.vpp

    def rank_of(self, chunk: int) -> int:
        return chunk % self.pp

    def mem_coeff(self, t: int, o: int, rank: int) -> float:
        """Bytes one unit of type t with option o adds to ``rank``."""
        return self.static[t] + (1 + self.fragmentation) * self.inflight[rank] * self.act[t][o]

    def rank_base(self, rank: int) -> tuple[float, float]:
        """(time, bytes) of a rank that do not depend on the partition. Chunk 0 (embedding) is on
        rank 0, chunk C-1 (head) on rank pp-1."""
        time = self.vpp * self.chunk_time
        mem = (1 + self.fragmentation) * self.buffers[rank] + self.reserve
        if rank == 0:
            time, mem = time + self.first_time, mem + self.first_static
        if rank == self.pp - 1:
            time, mem = time + self.last_time, mem + self.last_static
        return time, mem


@dataclass(frozen=True)
class Partition:
    sizes: tuple[int, ...]  # units per chunk
    options: tuple[int, ...]  # recompute option per chunk
    z: float  # busiest rank's seconds per micro-batch
    status: str  # OPTIMAL or FEASIBLE


def solve(problem: PartitionProblem, time_limit: float = 10.0,
          start: tuple | None = None) -> Partition | None:
    """Optimal partition, or None when no partition fits in memory. ``start`` = (sizes, options)
    of a partition known to fit warm-starts the general formulation (CBC then keeps at least it)."""
    if len(problem.unit_types) < problem.chunks:
        return None
    tied = len(set(problem.unit_types)) == 1
    if tied:
        prob, read = _tied_model(problem)
    else:
        prob, read = _general_model(problem, start)
    with warnings.catch_warnings():  # PuLP 3.3 announces API changes for 4.0 on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        prob.solve(pulp.PULP_CBC_CMD(msg=False, threads=1, timeLimit=time_limit,
                                     warmStart=start is not None and not tied))
    # PuLP's `status` says "Optimal" even for a timed-out solve; sol_status tells them apart.
    if prob.sol_status == pulp.LpSolutionOptimal:
        status = OPTIMAL
    elif prob.sol_status == pulp.LpSolutionIntegerFeasible:
        status = FEASIBLE
    else:
        return None
    sizes, options = read()
    return Partition(sizes=sizes, options=options, z=partition_time(problem, sizes, options),
                     status=status)


def _var(prob, name, low=None, up=None, cat="Continuous"):
    return prob.add_variable(name, low, up, cat=cat)


def _fits(prob, p: PartitionProblem, lhs) -> None:
    if p.capacity != float("inf"):
        prob += lhs <= p.capacity


def _tied_model(p: PartitionProblem):
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
    for r in range(p.pp):
        prob += pulp.lpSum(k[r, o] for o in p.options) == V  # each rank runs vpp chunks
        for o in p.options:
            prob += k[r, o] <= n[r, o]  # no empty chunk: a chunk holds at least one unit
            prob += n[r, o] <= U * k[r, o]  # units of option o live in chunks of option o
            prob += k[r, o] <= V * w[r, o]  # w marks an option the rank uses
            prob += trans[r] >= p.transient[0][o] * w[r, o]  # peak transient of the rank
        base_t, base_m = p.rank_base(r)
        # rank time: its units' forward + backward (with recompute) + fixed terms <= z
        prob += pulp.lpSum(n[r, o] * p.time[0][o] for o in p.options) + base_t <= z
        # rank memory: static + (1+frag)(inflight * activations + transient + buffers) + reserve
        _fits(prob, p, pulp.lpSum(n[r, o] * p.mem_coeff(0, o, r) for o in p.options)
              + (1 + p.fragmentation) * trans[r] + base_m)

    def read():
        per_chunk: dict = {}
        for r in range(p.pp):
            chunks = []
            for o in p.options:
                kk, nn = int(round(k[r, o].value() or 0)), int(round(n[r, o].value() or 0))
                chunks += [(size, o) for size in _even(nn, kk)]
            for v, chunk in enumerate(chunks):
                per_chunk[v * p.pp + r] = chunk
        order = [per_chunk[c] for c in range(p.chunks)]
        return tuple(s for s, _ in order), tuple(o for _, o in order)
    return prob, read


def _even(n: int, parts: int) -> list[int]:
    if parts <= 0:
        return []
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _window(p: PartitionProblem) -> int:
    U, C = len(p.unit_types), p.chunks
    return p.window or max(2, -(-U // (2 * C)))


def _general_model(p: PartitionProblem, start: tuple | None = None):
    """Heterogeneous units: prefix binaries y[u,c] with contiguity by monotonicity."""
    U, C = len(p.unit_types), p.chunks
    prob = pulp.LpProblem("stage_partition", pulp.LpMinimize)
    z = _var(prob, "z", 0)
    prob += z
    w = {(c, o): _var(prob, f"w_{c}_{o}", cat="Binary")  # chunk c runs option o
         for c in range(C) for o in p.options}
    win = _window(p)
    y = {}
    for c in range(C):
        boundary = (c + 1) * U / C  # even split: chunks <= c end here
        for u in range(U):
            if c == C - 1 or u < boundary - win:
                y[u, c] = 1  # surely placed in a chunk <= c
            elif u >= boundary + win:
                y[u, c] = 0
            else:
                y[u, c] = _var(prob, f"y_{u}_{c}", cat="Binary")
    x = {(u, c): y[u, c] - (y[u, c - 1] if c else 0) for u in range(U) for c in range(C)}
    for c in range(C):
        for u in range(U):
            if u and not _fixed(y[u, c], y[u - 1, c]):
                prob += y[u, c] <= y[u - 1, c]  # chunk index never decreases along the model
            if c and not _fixed(y[u, c - 1], y[u, c]):
                prob += y[u, c - 1] <= y[u, c]  # "in a chunk <= c-1" implies "<= c"
        prob += pulp.lpSum(x[u, c] for u in range(U)) >= 1  # no empty chunk
        prob += pulp.lpSum(w[c, o] for o in p.options) == 1
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
            worst = max(p.transient[t][o] for t in set(p.unit_types))
            prob += trans[r] >= worst * w[c, o]
    for r in range(p.pp):
        base_t, base_m = p.rank_base(r)
        mine = [c for c in range(C) if p.rank_of(c) == r]
        prob += pulp.lpSum(tc[c, o] for c in mine for o in p.options) + base_t <= z
        _fits(prob, p, pulp.lpSum(mc[c, o] for c in mine for o in p.options)
              + (1 + p.fragmentation) * trans[r] + base_m)

    if start is not None:
        _warm_start(y, w, *start)

    def read():
        sizes = tuple(int(round(sum(_val(x[u, c]) for u in range(U)))) for c in range(C))
        options = tuple(max(p.options, key=lambda o: w[c, o].value() or 0) for c in range(C))
        return sizes, options
    return prob, read


def _warm_start(y: dict, w: dict, sizes, options) -> None:
    chunk_of, u = [], 0
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


def partition_time(p: PartitionProblem, sizes, options) -> float:
    """Busiest rank's seconds per micro-batch for a given partition (the ILP's objective)."""
    return max(t for t, _ in rank_totals(p, sizes, options))


def partition_fits(p: PartitionProblem, sizes, options) -> bool:
    return all(m <= p.capacity * (1 + 1e-9) for _, m in rank_totals(p, sizes, options))


def rank_totals(p: PartitionProblem, sizes, options) -> list[tuple[float, float]]:
    """(seconds per micro-batch, bytes) of every rank under a partition — one pass over chunks."""
    if len(p.time) == 1 and len(set(options)) == 1:
        return _uniform_tied_totals(p, sizes, options[0])
    base = [p.rank_base(r) for r in range(p.pp)]
    time = [b[0] for b in base]
    mem = [b[1] for b in base]
    trans = [0.0] * p.pp
    start = 0
    for c, (size, o) in enumerate(zip(sizes, options)):
        r = p.rank_of(c)
        for t in p.unit_types[start:start + size]:
            time[r] += p.time[t][o]
            mem[r] += p.mem_coeff(t, o, r)
        start += size
        trans[r] = max([trans[r]] + [p.transient[t][o] for t in range(len(p.time))])
    return [(time[r], mem[r] + (1 + p.fragmentation) * trans[r]) for r in range(p.pp)]


def _uniform_tied_totals(p: PartitionProblem, sizes, o: int) -> list[tuple[float, float]]:
    """Closed form when every unit is alike and every chunk runs option o (the search's estimate)."""
    per_rank = [0] * p.pp
    for c, size in enumerate(sizes):
        per_rank[c % p.pp] += size
    t, act, static = p.time[0][o], p.act[0][o], p.static[0]
    grow = 1 + p.fragmentation
    out = []
    for r, n in enumerate(per_rank):
        bt, bm = p.rank_base(r)
        out.append((bt + n * t, bm + n * (static + grow * p.inflight[r] * act)
                    + grow * p.transient[0][o]))
    return out
