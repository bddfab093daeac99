"""The stage-partition problem and its exact solvers.

For one mesh, split the unit sequence into C = pp * vpp contiguous chunks (chunk c runs on pipeline
rank c mod pp) and choose a recompute option per chunk, minimising the busiest rank's time per
micro-batch z (the step is (m + (pp-1)/vpp) * z plus terms the partition does not change), subject
to every rank's memory fitting the device. Among the partitions that reach the least z, the one
with the least total time (the least recompute) is returned, so a rank that is not the bottleneck
does not recompute what it has room to keep.

Solvers chosen by the problem's structure:

  * tied (partition_tied.py; every unit alike: Llama, GPT, Mixtral; any vpp): exact, a closed
    form per rank and a knapsack over ranks, no solver.
  * chain (partition_chain.py; heterogeneous units, vpp = 1: every rank holds one chunk): exact, a
    dynamic program over chunks and prefix lengths (Alpa's stage-partition DP).
  * interleaved (partition_chain.py; heterogeneous units, vpp > 1: a rank's memory sums chunks far
    apart in the model): a balanced partition with its gap to ``lower_bound`` stated; the ILP in
    ``ilp.py`` (bounded by a node count, never by wall-clock time, warm-started from it) where
    memory is too tight for the balanced split or when asked for.
This module holds the problem, the result, the dispatcher and the objective they all share.
"""
from __future__ import annotations

from dataclasses import dataclass

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
    from .partition_chain import solve_chain, solve_interleaved
    from .partition_tied import solve_tied
    if problem.tied:
        return solve_tied(problem)
    if problem.vpp == 1:
        return solve_chain(problem)
    return solve_interleaved(problem, start=start, max_nodes=max_nodes)


def even_split(n: int, parts: int) -> list[int]:
    if parts <= 0:
        return []
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]




def lower_bound(p: PartitionProblem) -> float:
    """A proven lower bound on z: the cheapest-option work of all units plus every rank's fixed
    time, spread perfectly over the ranks, and no less than the busiest fixed time plus the
    cheapest vpp units."""
    cheapest = [min(p.time[t][o] for o in p.options) for t in p.unit_types]
    fixed = [p.rank_base(r)[0] for r in range(p.pp)]
    spread = (sum(cheapest) + sum(fixed)) / p.pp
    return max(spread, max(fixed) + sum(sorted(cheapest)[:p.vpp]))


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
