"""A collective's latency as training pays it, measured by `plait calibrate` (issue #17).

Back-to-back calls of a bare collective (calibrate_cost.collective_seconds) measure the
collective with both ranks already waiting for it: on the 2-core VM ~0.2-0.7 ms per small call.
In a training step every collective sits between two slices of compute on every rank, through
plait's own ops (lowering/collectives.py: a clone, the guard, the custom-op dispatch), with every
group of the node busy at once. On CPU ranks that share cores a rank that arrives first blocks,
and its peer (or gloo's I/O thread) runs only when the OS schedules it again: the arrival skew
and the wake-ups are paid per call, not per byte. So the latency is measured the way training
issues it:

    C  ``calls`` slices of plait's MLP block (forward + backward), alone, every rank at once
    T  the same slices, each followed by one plait op (reduce_from_tp / gather_seq) on a small
       activation, or one exchange of the ring attention's K and V blocks (lowering/cp_ops.py
       PeerExchange: one batch_isend_irecv of two sends to the next group rank and two receives
       from the previous, waited for), every group of the node at once

    in-situ seconds per call = (T - C) / calls

and each op's alpha is what that leaves after the bandwidth term of the bytes moved, over the
latency terms the cost model charges one call of it (insitu_latency; calibrate_cost.derive): an
all-reduce does not cost the 2x an all-gather its 2 (n-1) terms say once every call pays the
arrival skew and the wake-ups, and a ring exchange pays them once, so each op keeps its own. The
bare back-to-back time of the same op is recorded beside it.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from plait.lowering.cp_ops import PeerExchange

from .calibrate_ops import share_probe_model
from .calibrate_timing import group_mean, synchronize

AXIS = "calibrate-insitu"
OPS = ("all_reduce", "all_gather", "p2p")
# A compute slice: forward + backward of plait's MLP block on a few tokens, ~0.6 ms of host-bound
# work on this VM's cores, about what a TP / SP step runs between two collectives (tiny-local tp2:
# 307 calls in a ~0.2-0.3 s step; benchmarks/count_collectives.py)
TOKENS = 16
WIDTH = 128       # share_probe_model's hidden size
CALLS = 24        # collective calls per timed run
REPEAT = 5        # timed runs of each variant; the median is kept


def _issue(op: str, x: torch.Tensor, n: int, rank: int):
    """One plait op as a lowered graph calls it (reduce_from_tp: all-reduce; gather_seq:
    all-gather along the sequence; p2p: the ring attention's exchange of a K and a V block with
    the group's neighbours, as its backward waits for the dK / dV one, cp_attention.py)."""
    if op == "all_reduce":
        return torch.ops.plait.reduce_from_tp(x, AXIS, n)
    if op == "p2p":
        ring = PeerExchange(AXIS, n, rank)
        return ring.wait(ring.start(1, [x, x]))
    return torch.ops.plait.gather_seq(x, AXIS, n, 1)


def _moved(op: str, act: torch.Tensor, n: int) -> int:
    """Bytes of one call as planner/cost/comm.py sizes it: the full (gathered) tensor of a
    collective, the bytes one rank sends in an exchange (K and V)."""
    one = act.numel() * act.element_size()
    return {"all_gather": n * one, "all_reduce": one, "p2p": 2 * one}[op]


def _run(slice_fn, collective, calls: int, device) -> tuple[float, float]:
    """(seconds of ``calls`` rounds of (compute slice, collective) started together, seconds of
    them spent inside the collective calls)."""
    dist.barrier()
    start = time.perf_counter()
    inside = 0.0
    for _ in range(calls):
        if slice_fn is not None:
            slice_fn()
        if collective is not None:
            synchronize(device)
            t = time.perf_counter()
            collective()
            synchronize(device)
            inside += time.perf_counter() - t
    synchronize(device)
    return time.perf_counter() - start, inside


def measure_insitu(rank: int, groups: list[list[int]], dtype, device,
                   calls: int = CALLS, repeat: int = REPEAT) -> dict | None:
    """{op: {bytes: the full tensor's, insitu_s: seconds per call inside the op between compute
    slices, added_s: what the calls add to the slices' time, bare_s: seconds per call back to
    back, slice_s: one compute slice}}, each the mean over the world's ranks, on this
    rank's group of ``groups`` (every rank of the world must call this: each creates every
    group); None on ranks outside all groups."""
    from plait.lowering.collectives import bind_axis, unbind_all

    mine = None
    for ranks in groups:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = (group, ranks)
    layers = share_probe_model().to(device=device, dtype=dtype).layers[1:]  # the MLP block
    x = torch.randn(1, TOKENS, WIDTH, dtype=dtype, device=device, requires_grad=True)

    def slice_fn():
        y = x
        for layer in layers:
            y = layer(y)
        y.sum().backward()

    out: dict = {}
    n = len(mine[1]) if mine else 1
    if mine:
        bind_axis(AXIS, mine[0], tuple(mine[1]))
    act = torch.randn(1, TOKENS // n, WIDTH, dtype=dtype, device=device)
    for op in OPS:
        coll = (lambda op=op: _issue(op, act, n, mine[1].index(rank))) if mine else None
        slice_fn()
        if coll:
            coll()  # warm the op's dispatch and gloo's pairs
        alone, both, inside, bare = [], [], [], []
        for _ in range(repeat):  # interleaved so that a load swing hits all three alike
            alone.append(_run(slice_fn, None, calls, device)[0])
            total, waited = _run(slice_fn, coll, calls, device)
            both.append(total)
            inside.append(waited)
            bare.append(_run(None, coll, calls, device)[0])
        m = mine is not None
        out[op] = {"bytes": _moved(op, act, n),
                   "insitu_s": group_mean(statistics.median(inside), m) / calls,
                   "added_s": group_mean(statistics.median(both) - statistics.median(alone), m)
                   / calls, "bare_s": group_mean(statistics.median(bare), m) / calls,
                   "slice_s": group_mean(statistics.median(alone), m) / calls}
    if mine:
        unbind_all()
    return out if mine else None


def latency_terms(op: str, n: int) -> int:
    """Latency terms planner/cost/comm.py charges one call of ``op`` on ``n`` ranks: a ring
    all-gather (n-1), an all-reduce 2 (n-1), an exchange with the neighbours one."""
    return {"all_gather": n - 1, "all_reduce": 2 * (n - 1), "p2p": 1}[op]


def bytes_seconds(op: str, n: int, nbytes: float, bandwidth: float) -> float:
    """The bandwidth term planner/cost/comm.py charges one call moving ``nbytes``."""
    if op == "p2p":
        return nbytes / bandwidth
    return latency_terms(op, n) / n * nbytes / bandwidth


@dataclass(frozen=True)
class InsituLatency:
    """Seconds per latency term: ``alpha`` the median over the collectives (intra_latency_us,
    what an op without its own value pays), ``per_op`` each op's median over group sizes, and
    all_gather_synced: an all-gather whose peers arrive together, from the back-to-back calls
    (at most the in-situ value)."""

    alpha: float
    per_op: tuple[tuple[str, float], ...]
    how: str


def insitu_latency(points: list, bandwidth: float) -> InsituLatency:
    """From calibrate_insitu's [(group size, {op: ...})]: what each call adds to the compute
    around it, less the bytes' time at the fitted bandwidth, over the latency terms the cost
    model charges that op."""
    by_op: dict = {}
    parts = []
    for n, ops in points:
        for op, m in ops.items():
            terms, moved = latency_terms(op, n), bytes_seconds(op, n, m["bytes"], bandwidth)
            left = max(0.0, m["added_s"] - moved)
            by_op.setdefault(op, []).append(left / terms)
            if op == "all_gather":
                synced = min(left, max(0.0, m["bare_s"] - moved))
                by_op.setdefault(f"{op}_synced", []).append(synced / terms)
            parts.append(f"{op} x{n} {m['added_s'] * 1e3:.2f} ms (bare {m['bare_s'] * 1e3:.2f})")
    per_op = tuple((op, statistics.median(v)) for op, v in sorted(by_op.items()))
    collectives = [a for op, v in by_op.items() if op in ("all_reduce", "all_gather") for a in v]
    alpha = statistics.median(collectives or [a for v in by_op.values() for a in v])
    return InsituLatency(alpha, per_op, (
        "small collectives and ring exchanges through plait's ops between decoder compute "
        "slices, every group at once (runtime/calibrate_insitu.py): " + ", ".join(parts)
        + " per call -> " + ", ".join(f"{op} {a * 1e6:.0f}" for op, a in per_op)
        + " us per latency term"))
