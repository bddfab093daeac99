"""How much of a collective compute beside it hides, measured on the machine (`plait calibrate`).

The runtime overlaps FSDP's parameter all-gathers and gradient reduce-scatters with compute, and
ring context parallelism's K/V send / recv (p2p: each rank to the next, from the previous) with the
attention core: they are issued asynchronously (NCCL on its own CUDA stream; gloo in its worker
threads) while the default stream / the main thread computes. How much that hides is a property of
the machine and the stack, not of the schedule: NCCL kernels take SMs and HBM bandwidth from the
GEMMs, CPU ranks share cores with gloo's threads, one hardware queue (CUDA_DEVICE_MAX_CONNECTIONS=1)
serialises them. So it is measured, per collective kind, on the ranks of one node:

    C  a run of GEMMs alone (about 1.5 x the collective, so the collective fits inside it)
    M  the collective alone (async, waited for)
    T  both: the collective issued asynchronously, the GEMMs run, then the collective waited for

    hidden fraction = (C + M - T) / min(C, M), clipped to [0, 1]

1: T = max(C, M), everything hidden; 0: T = C + M, the two serialised. This is the cost model's
overlap_KIND (planner/cost/comm.py hidden: eff x min(collective, compute)).
"""
from __future__ import annotations

import math
import os
from typing import Callable

import torch
import torch.distributed as dist

from .calibrate_timing import synchronize, timed

KINDS = ("all_gather", "reduce_scatter", "all_to_all", "p2p")
COMPUTE_OVER_COLLECTIVE = 1.5  # GEMM time over collective time in the "both" run


def _collective(op: str, group, n: int, nbytes: int, device) -> Callable[[], object]:
    """A function issuing ``op`` asynchronously over ``group`` (``nbytes``: its full tensor) and
    returning the work handle."""
    elems = max(n, nbytes // 4 // n * n)
    full = torch.randn(elems, device=device)
    shard = torch.empty(elems // n, device=device)
    if op == "all_gather":
        return lambda: dist.all_gather_into_tensor(full, shard, group=group, async_op=True)
    if op == "reduce_scatter":
        return lambda: dist.reduce_scatter_tensor(shard, full, group=group, async_op=True)
    recv = torch.empty_like(full)
    if op == "p2p":  # a ring step: send to the next rank, receive from the previous one
        return _ring_step(group, n, full, recv)
    return lambda: dist.all_to_all_single(recv, full, group=group, async_op=True)


class _Waits:
    """Several asynchronous operations waited for as one (batch_isend_irecv's works)."""

    def __init__(self, works):
        self.works = works

    def wait(self):
        for work in self.works:
            work.wait()


def _ring_step(group, n: int, send: torch.Tensor, recv: torch.Tensor) -> Callable[[], object]:
    """The K/V exchange of one ring-attention step over ``group`` (node 0's ranks, so group
    ranks equal global ranks): ``send`` to rank + 1, ``recv`` from rank - 1."""
    rank = dist.get_rank()
    ops = [dist.P2POp(dist.isend, send, (rank + 1) % n, group),
           dist.P2POp(dist.irecv, recv, (rank - 1) % n, group)]
    return lambda: _Waits(dist.batch_isend_irecv(ops))


def overlap_point(op: str, group, n: int, nbytes: int, shape: tuple[int, int, int], dtype,
                  device, repeat: int = 5) -> dict:
    """{"compute_s", "collective_s", "both_s", "gemms"} of one collective kind on ``group``;
    every rank of the group calls it."""
    issue = _collective(op, group, n, nbytes, device)
    m, k, n_ = shape
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n_, dtype=dtype, device=device)
    one_gemm = timed(lambda: a @ b, device, repeat)
    dist.barrier(group=group)
    collective = timed(lambda: issue().wait(), device, repeat, warmup=1)
    # every rank runs the same number of GEMMs (rank 0's choice), as a layer's ranks do
    count = torch.tensor([max(1, math.ceil(COMPUTE_OVER_COLLECTIVE * collective / one_gemm))],
                         device=device)  # NCCL broadcasts device tensors only
    dist.broadcast(count, src=0, group=group)  # the group is node 0's ranks: global rank 0 leads
    gemms = int(count.item())

    def compute():
        for _ in range(gemms):
            a @ b

    def both():
        work = issue()
        compute()
        work.wait()
        synchronize(device)

    dist.barrier(group=group)
    alone = timed(compute, device, repeat, warmup=1)
    dist.barrier(group=group)
    together = timed(both, device, repeat, warmup=1)
    return {"compute_s": alone, "collective_s": collective, "both_s": together, "gemms": gemms}


# an accelerator: a transformer layer's FSDP gather (hundreds of MB) beside GEMMs of a layer's
# size, so launch latencies do not decide the fraction; the CPU: the quick network size and GEMM
CUDA_POINT = (256 << 20, (4096, 4096, 4096))


def measure_overlap(rank: int, world: int, gpn: int, nbytes: int, shape: tuple[int, int, int],
                    dtype, device) -> dict:
    """{kind: overlap_point} on the ranks of node 0 (every rank creates the group; the others
    return {}). Needs two ranks on a node. On CUDA the message and GEMM are CUDA_POINT's."""
    if device.type == "cuda":
        nbytes, shape = CUDA_POINT
    ranks = list(range(min(world, gpn)))
    if len(ranks) < 2:
        return {}
    group = dist.new_group(ranks)
    if rank not in ranks:
        return {}
    return {op: overlap_point(op, group, len(ranks), nbytes, shape, dtype, device) for op in KINDS}


def hidden_fraction(point: dict) -> float:
    """(C + M - T) / min(C, M), clipped to [0, 1]: the share of the overlapped time hidden."""
    c, m, t = point["compute_s"], point["collective_s"], point["both_s"]
    if min(c, m) <= 0:
        return 0.0
    return min(1.0, max(0.0, (c + m - t) / min(c, m)))


def derive_overlap(measured: dict, ranks: int) -> tuple[dict, dict]:
    """(overlap_KIND values, how each was measured) from measure_overlap's points."""
    values, sources = {}, {}
    queues = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
    stack = f"; CUDA_DEVICE_MAX_CONNECTIONS={queues}" if queues else ""
    for op, point in sorted(measured.items()):
        key = f"overlap_{op}"
        values[key] = hidden_fraction(point)
        sources[key] = (f"{op.replace('_', '-')} over {ranks} ranks beside {point['gemms']} GEMMs: "
                        f"alone {point['collective_s'] * 1e3:.2f} ms and "
                        f"{point['compute_s'] * 1e3:.2f} ms, together "
                        f"{point['both_s'] * 1e3:.2f} ms{stack}")
    return values, sources
