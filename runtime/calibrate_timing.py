"""Wall-clock timing of `plait calibrate`'s micro-benchmarks (runtime/calibrate_cost.py,
runtime/calibrate_overlap.py): asynchronous devices are synchronised before the clock is read."""
from __future__ import annotations

import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeat: int = 5, warmup: int = 2) -> float:
    """Fastest of ``repeat`` runs of ``fn`` after ``warmup``, in seconds: what the machine can do
    (other work on a shared machine only ever slows a run down, so the minimum is the estimate
    that noise disturbs least)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - start)
    return min(out)


def sum_over_world(values: list[float]) -> list[float]:
    """``values`` summed over every rank of the world (each calls this), through the default
    group on the device its backend reduces on: NCCL reduces CUDA tensors only."""
    import torch.distributed as dist

    device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
              else torch.device("cpu"))
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def group_mean(value: float, member: bool) -> float:
    """The mean of ``value`` over the ranks in a group (every rank of the world calls this; ranks
    outside the group pass member=False): the ranks a collective makes wait and the ranks it keeps
    waiting pay different shares of the same skew."""
    total, members = sum_over_world([value if member else 0.0, 1.0 if member else 0.0])
    return total / max(1.0, members)
