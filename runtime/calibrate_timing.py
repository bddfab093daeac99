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
