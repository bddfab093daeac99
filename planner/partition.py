"""The stage-partition problem and its exact solvers.

For one mesh, split the unit sequence into C = pp * vpp contiguous chunks (chunk c runs on pipeline
rank c mod pp) and choose a recompute option per chunk, minimising the busiest rank's time per
micro-batch z (the step is (m + (pp-1)/vpp) * z plus terms the partition does not change), subject
to every rank's memory fitting the device. Among the partitions that reach the least z, the one
with the least total time (the least recompute) is returned, so a rank that is not the bottleneck
does not recompute what it has room to keep.

Three solvers, each exact for that objective, chosen by the problem's structure:

  * tied (every unit alike: Llama, GPT, Mixtral; any vpp): only per-rank unit counts matter.
    F_r(n), rank r's least time to hold n units within its memory (every option mix), is a
    non-decreasing step function; the optimum z* is the least value of any F_r(n) at which the
    ranks' largest fitting counts add up to the model. A small knapsack over ranks then picks the
    counts of least total time under z*. No solver: closed forms vectorised over n.
  * chain (heterogeneous units, vpp = 1: every rank holds one chunk): a dynamic program over
    chunks and prefix lengths (Alpa's stage-partition DP with per-chunk memory feasibility).
  * general (heterogeneous units, vpp > 1: a rank's memory sums chunks far apart in the model):
    the ILP in ``ilp.py``, bounded by a node count, never by wall-clock time, warm-started from
    the best known partition; a result that is not proven says so with its gap.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import combinations

import numpy as np

OPTIMAL, FEASIBLE = "optimal", "feasible"  # FEASIBLE: a work limit stopped the proof
INF = float("inf")
TOL = 1e-9  # relative slack on capacity and on z* (sums taken in another order round differently)


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
    capacity: float = INF
    options: tuple[int, ...] = (0, 1, 2)  # allowed recompute options
    window: int = 0  # general ILP: max shift of a boundary from the even split (0: auto)

    @property
    def chunks(self) -> int:
        return self.pp * self.vpp

    @property
    def tied(self) -> bool:
        return len(set(self.unit_types)) == 1

    def rank_of(self, chunk: int) -> int:
        return chunk % self.pp

    def mem_coeff(self, t: int, o: int, rank: int) -> float:
        """Bytes one unit of type t with option o adds to ``rank``."""
        return self.static[t] + (1 + self.fragmentation) * self.inflight[rank] * self.act[t][o]

    def option_transient(self, o: int) -> float:
        """Bytes alive during the backward of the rank's largest unit under option o."""
        return max(self.transient[t][o] for t in range(len(self.time)))

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
    status: str  # OPTIMAL (proven) or FEASIBLE (a work limit stopped the proof)
    bound: float = 0.0  # proven lower bound on the least z (= z when OPTIMAL)
    method: str = ""  # tied | chain | ilp
    nodes: int = 0  # branch-and-bound nodes (ilp)

    @property
    def gap(self) -> float:
        """Relative distance between the partition found and the proven bound."""
        return 0.0 if self.status == OPTIMAL else max(0.0, (self.z - self.bound) / self.z)


def solve(problem: PartitionProblem, start: tuple | None = None,
          max_nodes: int | None = None) -> Partition | None:
    """The least-z partition (proven), or None when no partition fits in memory. Heterogeneous
    units with vpp > 1 go to the ILP; ``start`` = (sizes, options) of a partition known to fit
    warm-starts it, ``max_nodes`` bounds its branch and bound."""
    if len(problem.unit_types) < problem.chunks:
        return None
    if problem.tied:
        return solve_tied(problem)
    if problem.vpp == 1:
        return solve_chain(problem)
    return solve_interleaved(problem, start=start, max_nodes=max_nodes)


# ------------------------------------------------------------------------------------------------
# Tied: every unit alike
# ------------------------------------------------------------------------------------------------

def _mixes(p: PartitionProblem) -> list[tuple[int, ...]]:
    """Option sets a rank may use: non-empty, at most vpp of them (one option per chunk)."""
    return [s for k in range(1, min(len(p.options), p.vpp) + 1) for s in combinations(p.options, k)]


def _pair(m, budget, a: tuple[float, float], b: tuple[float, float]):
    """Least time of m units split n_a + n_b = m (both >= 1) with n_a*mem_a + n_b*mem_b <= budget,
    vectorised over m and budget. ``a``, ``b`` = (time, mem) per unit -> (time, n_a), inf when
    no split fits."""
    (ta, ma), (tb, mb) = a, b
    m = np.asarray(m, dtype=float)
    lo, hi = np.ones_like(m), m - 1
    slack = budget - m * mb  # n_a * (ma - mb) <= slack
    d = ma - mb
    with np.errstate(divide="ignore", invalid="ignore"):
        if d > 0:
            hi = np.minimum(hi, np.floor(slack / d + TOL))
        elif d < 0:
            lo = np.maximum(lo, np.ceil(slack / d - TOL))
        else:
            lo = np.where(slack >= -TOL * np.abs(budget), lo, np.inf)
    n_a = hi if ta < tb else lo  # time is linear in n_a: take the cheaper end
    ok = (lo <= hi) & (m >= 2)
    time = np.where(ok, n_a * ta + (m - n_a) * tb, np.inf)
    return time, np.where(ok, n_a, 0)


def _rank_table(p: PartitionProblem, r: int, ns: np.ndarray):
    """F_r(n) for n in ``ns``: rank r's least time holding n units (base included), and the
    option counts that reach it ({option: count} per n), inf where nothing fits."""
    base_t, base_m = p.rank_base(r)
    grow = 1 + p.fragmentation
    cap = p.capacity * (1 + TOL) if p.capacity < INF else INF
    per = {o: (p.time[0][o], p.mem_coeff(0, o, r)) for o in p.options}
    best = np.full(len(ns), np.inf)
    choice: list[dict] = [{} for _ in ns]
    for mix in _mixes(p):
        budget = cap - base_m - grow * max(p.option_transient(o) for o in mix)
        for time, counts in _mix_times(ns, budget, [per[o] for o in mix]):
            better = time < best
            best = np.where(better, time, best)
            for i in np.nonzero(better)[0]:
                choice[i] = {o: int(c[i]) for o, c in zip(mix, counts) if c[i] > 0}
    return best + base_t, choice


def _mix_times(ns: np.ndarray, budget: float, per: list[tuple[float, float]]):
    """(time, [count per option]) arrays over n for one option set (every option used at least
    once). Three options: every count of the third, the other two in closed form."""
    n = ns.astype(float)
    if len(per) == 1:
        (t, m), = per
        fits = n * m <= budget if budget < INF else np.ones_like(n, dtype=bool)
        yield np.where(fits, n * t, np.inf), [ns]
    elif len(per) == 2:
        time, n_a = _pair(n, budget, per[0], per[1])
        yield time, [n_a, np.where(np.isfinite(time), n - n_a, 0)]
    else:  # a grid over (n, k = units of the third option), the best k per n
        (tc, mc) = per[2]
        k = np.arange(1, max(2, int(ns.max()) - 1), dtype=float)[None, :]
        rest = n[:, None] - k
        time, n_a = _pair(rest, budget - k * mc, per[0], per[1])
        time = np.where(rest >= 2, time + k * tc, np.inf)
        pick = np.argmin(time, axis=1)
        rows = np.arange(len(n))
        time, n_a, k = time[rows, pick], n_a[rows, pick], k[0, pick]
        used = np.isfinite(time)
        yield time, [n_a, np.where(used, n - k - n_a, 0), np.where(used, k, 0)]


def solve_tied(p: PartitionProblem) -> Partition | None:
    U, V, pp = len(p.unit_types), p.vpp, p.pp
    ns = np.arange(V, U - (pp - 1) * V + 1)
    tables = [_rank_table(p, r, ns) for r in range(pp)]
    values = np.unique(np.concatenate([t for t, _ in tables]))
    values = values[np.isfinite(values)]
    if not len(values) or _capacity_at(tables, ns, values[-1]) < U:
        return None
    lo, hi = 0, len(values) - 1  # least value at which the ranks hold every unit
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _capacity_at(tables, ns, values[mid]) >= U else (mid + 1, hi)
    z_star = float(values[lo])
    counts = _least_total(tables, ns, U, z_star)
    per_rank = [tables[r][1][counts[r] - V] for r in range(pp)]
    sizes, options = _chunks_of(per_rank, pp, V)
    z = partition_time(p, sizes, options)
    return Partition(sizes=sizes, options=options, z=z, status=OPTIMAL, bound=z, method="tied")


def _capacity_at(tables, ns: np.ndarray, z: float) -> int:
    """Units the ranks can hold together with none above time z (-1 if a rank holds none).
    F_r is non-decreasing in n (dropping a unit never costs time or memory), so each rank's
    largest fitting count is its whole fitting range."""
    total = 0
    for time, _ in tables:
        fits = np.nonzero(time <= z)[0]
        if not len(fits):
            return -1
        total += int(ns[fits[-1]])
    return total


def _least_total(tables, ns: np.ndarray, U: int, z: float) -> list[int]:
    """Per-rank unit counts (sum U, each rank within time z) of least total time: a knapsack
    over ranks, exact. Returns counts as offsets into ``ns``."""
    V = int(ns[0])
    need = U - V * len(tables)  # units beyond every rank's minimum
    width = len(ns)
    acc = np.full(need + 1, np.inf)
    acc[0] = 0.0
    picks = []
    for time, _ in tables:
        cost = np.where(time <= z, time, np.inf)  # cost[i]: i units beyond the minimum
        grid = np.full((need + 1, width), np.inf)  # grid[k, i] = acc[k - i] + cost[i]
        for i in range(min(width, need + 1)):
            grid[i:, i] = acc[:need + 1 - i] + cost[i]
        pick = np.argmin(grid, axis=1)
        acc = grid[np.arange(need + 1), pick]
        picks.append(pick)
    out, k = [], need
    for pick in reversed(picks):
        i = int(pick[k])
        out.append(i)
        k -= i
    return [i + V for i in reversed(out)]


def _chunks_of(per_rank: list[dict], pp: int, V: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Rank r's option counts -> its V chunks (each option at least one chunk, the rest to the
    options with the most units), chunk c on rank c mod pp."""
    per_chunk = {}
    for r, mix in enumerate(per_rank):
        k = {o: 1 for o in mix}
        for _ in range(V - len(mix)):
            o = max(mix, key=lambda o: (mix[o] - k[o], -o))
            k[o] += 1
        chunks = [(size, o) for o in sorted(mix) for size in even_split(mix[o], k[o])]
        for v, chunk in enumerate(chunks):
            per_chunk[v * pp + r] = chunk
    order = [per_chunk[c] for c in range(pp * V)]
    return tuple(s for s, _ in order), tuple(o for _, o in order)


def even_split(n: int, parts: int) -> list[int]:
    if parts <= 0:
        return []
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# ------------------------------------------------------------------------------------------------
# Chain: heterogeneous units, one chunk per rank
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

def lower_bound(p: PartitionProblem) -> float:
    """A proven lower bound on z: the cheapest-option work of all units plus every rank's fixed
    time, spread perfectly over the ranks, and no less than the busiest fixed time plus the
    cheapest vpp units."""
    cheapest = [min(p.time[t][o] for o in p.options) for t in p.unit_types]
    fixed = [p.rank_base(r)[0] for r in range(p.pp)]
    spread = (sum(cheapest) + sum(fixed)) / p.pp
    return max(spread, max(fixed) + sum(sorted(cheapest)[:p.vpp]))


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


# ------------------------------------------------------------------------------------------------
# Evaluating a partition (the objective every solver shares)
# ------------------------------------------------------------------------------------------------

def partition_time(p: PartitionProblem, sizes, options) -> float:
    """Busiest rank's seconds per micro-batch for a given partition (the solvers' objective)."""
    return max(t for t, _ in rank_totals(p, sizes, options))


def partition_fits(p: PartitionProblem, sizes, options) -> bool:
    return all(m <= p.capacity * (1 + TOL) for _, m in rank_totals(p, sizes, options))


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
        trans[r] = max(trans[r], p.option_transient(o))
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
