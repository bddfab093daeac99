"""What a recomputing stage program calls at training time (see passes/recompute.py for the
pass that emits the calls). Imports nothing of plait, so any module may ask `is_recomputing()`.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                    create_selective_checkpoint_contexts)

aten = torch.ops.aten
# Compute-heavy ops whose outputs selective recompute keeps.
KEPT_OPS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.convolution, aten._grouped_mm,
            aten._scaled_mm, aten._int_mm}
# Namespaces of ops that communicate (or wrap communication): never re-run in backward.
KEPT_NAMESPACES = {"plait", "_c10d_functional", "c10d_functional", "c10d"}

_RECOMPUTING = [0]
_OPAQUE = [0]


def is_recomputing() -> bool:
    """True while a checkpointed region re-runs its forward during backward."""
    return _RECOMPUTING[0] > 0


@contextmanager
def _recomputing():
    _RECOMPUTING[0] += 1
    try:
        yield
    finally:
        _RECOMPUTING[0] -= 1


@contextmanager
def opaque_to_selective():
    """Ops run inside are one kernel to selective recompute: none of their outputs is kept (the
    pure-PyTorch SSD scan's einsums would otherwise be kept as matmuls; mamba-ssm's fused scan is
    a single op that selective recompute re-runs)."""
    _OPAQUE[0] += 1
    try:
        yield
    finally:
        _OPAQUE[0] -= 1


def selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep matmul and collective outputs; recompute the cheap, memory-heavy rest."""
    if _OPAQUE[0] > 0:
        return CheckpointPolicy.PREFER_RECOMPUTE
    packet = getattr(op, "overloadpacket", op)
    if packet in KEPT_OPS or getattr(op, "namespace", "") in KEPT_NAMESPACES:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed(region: nn.Module, mode: str, *args):
    """``region(*args)`` under torch.utils.checkpoint; ``mode`` is "full" or "selective"."""
    calls = [0]

    def run(*inputs):
        calls[0] += 1
        if calls[0] == 1:
            return region(*inputs)
        with _recomputing():
            return region(*inputs)

    if mode == "selective":
        context = functools.partial(create_selective_checkpoint_contexts, selective_policy)
        return checkpoint(run, *args, use_reentrant=False, context_fn=context)
    return checkpoint(run, *args, use_reentrant=False)
