"""Stage partition, every unit alike (Llama, GPT, Mixtral; any vpp): exact without a solver.

Only per-rank unit counts matter. F_r(n), rank r's least time to hold n units within its memory
(every option mix), is a non-decreasing step function; the least z is the least value of any
F_r(n) at which the ranks' largest fitting counts add up to the model; a knapsack over ranks then
picks the counts of least total time under it. Closed forms vectorised over n (numpy).
"""
from __future__ import annotations

from itertools import combinations

import numpy as np

from .partition import (INF, OPTIMAL, TOL, Partition, PartitionProblem, even_split,
                        partition_time)


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
