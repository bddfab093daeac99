"""torch AdamW as plait's runtime builds it: Megatron's parameter groups (weight decay on matrices
only), the implementation ir/counts/optimizer.py adamw_path picks for the parameters' device (the
choice the cost model's optimizer_bytes is priced from), and the LR schedule. Re-exported by
runtime/optim.py, which steps it for each data-parallel kind."""
from __future__ import annotations

import logging
import math
from typing import Iterable

import torch

from plait.ir import counts
from plait.ir.job import Optimizer as OptimizerSpec

log = logging.getLogger("plait.optim")
_LOGGED_PATHS: set[str] = set()  # each AdamW path is logged once per process


def decays(name: str, p: torch.Tensor) -> bool:
    """Weight decay on matrices only (not on norms, biases), as Megatron does."""
    return p.ndim >= 2


def param_groups(named: Iterable[tuple[str, torch.Tensor]], weight_decay: float) -> list[dict]:
    named = list(named)
    return [{"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]


def optimizer_path(params: Iterable[torch.Tensor]) -> counts.AdamWPath:
    """The AdamW implementation for ``params`` (counts.adamw_path on their device type)."""
    params = list(params)
    device = params[0].device.type if params else "cpu"
    return counts.adamw_path(device, all(torch.is_floating_point(p) for p in params))


def adamw(groups: list[dict], spec: OptimizerSpec) -> torch.optim.AdamW:
    """torch AdamW over ``groups``, fused / foreach / single-tensor as optimizer_path says; the
    path is kept on the optimizer as ``plait_path``."""
    path = optimizer_path(p for g in groups for p in g["params"])
    if path.kernel not in _LOGGED_PATHS:
        _LOGGED_PATHS.add(path.kernel)
        log.info("AdamW: %s (%s), %d bytes per parameter with the clip", path.kernel, path.reason,
                 path.step_bytes)
    optimizer = torch.optim.AdamW(groups, lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps,
                                  fused=path.fused, foreach=path.foreach)
    optimizer.plait_path = path
    return optimizer


def fresh_step(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor:
    """A step counter as the optimizer's first step would create it: float32 on the parameter's
    device for the fused kernel (which reads it there), a CPU scalar otherwise."""
    if optimizer.defaults.get("fused"):
        return torch.zeros((), dtype=torch.float32, device=p.device)
    return torch.tensor(0.0)


def lr_at(step: int, spec: OptimizerSpec, total_steps: int) -> float:
    """Linear warmup to lr, then cosine (or constant / linear) decay to min_lr."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    span = max(1, total_steps - spec.warmup)
    progress = min(1.0, (step - spec.warmup) / span)
    if spec.schedule == "constant":
        return spec.lr
    if spec.schedule == "linear":
        return spec.lr + (spec.min_lr - spec.lr) * progress
    return spec.min_lr + 0.5 * (spec.lr - spec.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
