"""Wall-clock timing of `plait calibrate`'s micro-benchmarks (runtime/calibrate_cost.py,
runtime/calibrate_overlap.py): asynchronous devices are synchronised before the clock is read."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch

# Which of a probe's repeats stands for it (`plait calibrate --statistic`, set once per process by
# use_statistic). "median", the default: the typical run, what the plan predicts (a run's step time
# is its median step) and what a training step meets on a machine other work shares. "min": the
# fastest, what the machine can do when nothing disturbs it (other work only ever slows a run).
# On a quiet machine (a GPU node) the two agree. On the shared 2-core VM, three paired runs of
# benchmarks/predict_vs_measure.py --compare-statistic (the same measured steps, calibrations made
# one after the other): mean |error| against the median step 19.7 / 17.4 / 17.5% with "min",
# 9.9 / 11.6 / 10.0% with "median"; signed means -19.7 / -14.9 / -4.2% against -7.0 / -9.1 / -3.5%.
STATISTICS = ("median", "min")
_STATISTIC = ["median"]


def use_statistic(name: str) -> None:
    if name not in STATISTICS:
        raise ValueError(f"statistic {name!r}: one of {', '.join(STATISTICS)}")
    _STATISTIC[0] = name


def statistic() -> str:
    return _STATISTIC[0]


def representative(samples: Sequence[float]) -> float:
    """The repeat that stands for ``samples`` under the statistic in use."""
    return min(samples) if _STATISTIC[0] == "min" else statistics.median(samples)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeat: int = 5, warmup: int = 2) -> float:
    """The representative (the median, or the fastest: use_statistic) of ``repeat`` runs of
    ``fn`` after ``warmup``, in seconds."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - start)
    return representative(out)


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
