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
       activation, every group of the node at once

    in-situ seconds per call = (T - C) / calls

and the cost model's alpha is what that leaves after the bandwidth term of the bytes moved
(calibrate_cost.derive). The bare back-to-back time of the same op is recorded beside it.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from .calibrate_ops import share_probe_model
from .calibrate_timing import synchronize

AXIS = "calibrate-insitu"
OPS = ("all_reduce", "all_gather")
# A compute slice: forward + backward of plait's MLP block on a few tokens, ~0.6 ms of host-bound
# work on this VM's cores, about what a TP / SP step runs between two collectives (tiny-local tp2:
# 307 calls in a ~0.2-0.3 s step; benchmarks/count_collectives.py)
TOKENS = 16
WIDTH = 128       # share_probe_model's hidden size
CALLS = 24        # collective calls per timed run
REPEAT = 5        # timed runs of each variant; the median is kept


def _issue(op: str, x: torch.Tensor, n: int) -> torch.Tensor:
    """One plait op as a lowered graph calls it (reduce_from_tp: all-reduce; gather_seq:
    all-gather along the sequence)."""
    if op == "all_reduce":
        return torch.ops.plait.reduce_from_tp(x, AXIS, n)
    return torch.ops.plait.gather_seq(x, AXIS, n, 1)


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


def _group_mean(value: float, member: bool) -> float:
    """The mean of ``value`` over the ranks in a group (every rank calls this): the ranks a
    collective makes wait and the ranks it keeps waiting pay different shares of the same skew."""
    t = torch.tensor([value if member else 0.0, 1.0 if member else 0.0], dtype=torch.float64)
    dist.all_reduce(t)
    return t[0].item() / max(1.0, t[1].item())


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
        coll = (lambda op=op: _issue(op, act, n)) if mine else None
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
        full = act.numel() * act.element_size() * (n if op == "all_gather" else 1)
        m = mine is not None
        out[op] = {"bytes": full, "insitu_s": _group_mean(statistics.median(inside), m) / calls,
                   "added_s": _group_mean(statistics.median(both) - statistics.median(alone), m)
                   / calls, "bare_s": _group_mean(statistics.median(bare), m) / calls,
                   "slice_s": _group_mean(statistics.median(alone), m) / calls}
    if mine:
        unbind_all()
    return out if mine else None


# Latency terms the cost model charges one call of each op (planner/cost/comm.py): a ring
# all-gather (n-1) alphas, an all-reduce 2 (n-1)
HOPS = {"all_gather": 1, "all_reduce": 2}


def insitu_latency(points: list, bandwidth: float) -> tuple[float, str]:
    """(alpha seconds, how measured) from calibrate_insitu's [(group size, {op: ...})]: what each
    call adds to the compute around it, less the bytes' time at the fitted bandwidth, over the
    latency terms the cost model charges that op; the median over ops and group sizes."""
    alphas, parts = [], []
    for n, ops in points:
        for op, m in ops.items():
            moved = HOPS[op] * (n - 1) / n * m["bytes"] / bandwidth
            alphas.append(max(0.0, m["added_s"] - moved) / (HOPS[op] * (n - 1)))
            parts.append(f"{op} x{n} {m['added_s'] * 1e3:.2f} ms (bare {m['bare_s'] * 1e3:.2f})")
    alpha = statistics.median(alphas)
    return alpha, (f"small collectives through plait's ops between decoder compute slices, every "
                   f"group at once (runtime/calibrate_insitu.py): " + ", ".join(parts)
                   + f" per call -> {alpha * 1e6:.0f} us per latency term")
