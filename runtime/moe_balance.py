"""Aux-loss-free expert balancing (DeepSeek-V3; Megatron-Core's ``moe_router_enable_expert_bias``):
once per optimizer step every MoE layer whose spec has ``expert_bias`` moves its selection bias
by ``rate * sign(mean(load) - load)``, ``load`` being the tokens routed to each expert during the
step (all micro-batches), and clears its counter.

Which ranks' counts make up ``load``: every rank of a pipeline stage routes different tokens. The
attention layout splits the stage's tokens over DP x CP (batch and sequence shards) and, since MoE
with TP requires sequence parallelism, over TP (sequence chunks); the expert layout ETP x EP x EDP
covers the same ranks and routes no token twice (each rank routes the tokens it holds, the
dispatcher only moves them). So a sum over TP and then over DP x CP gives the stage's global
count, the same on every rank of the stage, and every rank applies the same update: the result
equals the single-device reference's update over the whole global batch. Pipeline stages own
different layers, so no reduction crosses PP. (Megatron-Core all-reduces over its
tensor-and-data-parallel group with CP, the same ranks.)

The load counter skips the forward that activation recompute re-runs during backward
(``lowering.recompute.is_recomputing``), so each token is counted once.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from plait.lowering import collectives as cc
from plait.lowering.modules.moe import update_expert_bias

# The axes whose ranks hold different tokens of one pipeline stage (see the module docstring).
TOKEN_AXES = ("tp", "dp-cp")


def bias_blocks(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """MoE mixers (reference or expert-parallel) that carry an expert bias, in module order."""
    out = []
    for module in modules:
        for m in module.modules():
            if isinstance(getattr(m, "expert_bias", None), torch.Tensor) and \
                    isinstance(getattr(m, "expert_load", None), torch.Tensor):
                out.append(m)
    return out


def token_axes(mesh) -> tuple[str, ...]:
    """The mesh axes of size > 1 to sum the expert load over."""
    return tuple(a for a in TOKEN_AXES if a in mesh.members and mesh.size(a) > 1)


@torch.no_grad()
def update_expert_biases(modules: Iterable[nn.Module], rate: float,
                         axes: Sequence[str] = ()) -> int:
    """Sum every bias block's load over ``axes`` (one all-reduce per axis for all layers
    together) and apply the update; returns the number of layers updated."""
    blocks = bias_blocks(modules)
    if not blocks:
        return 0
    load = torch.stack([b.expert_load.float() for b in blocks])
    for axis in axes:
        load = cc.all_reduce(load, "sum", axis)
    for block, layer_load in zip(blocks, load):
        update_expert_bias(block, rate, layer_load)
    return len(blocks)
