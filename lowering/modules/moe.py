"""The MoE mixer: fp32 router -> top-k routing (routing.py) -> permute by expert -> grouped expert
MLPs -> weighted unpermute, plus an optional shared expert (with Qwen2-MoE's sigmoid gate).

Dropless by default; with a capacity factor, tokens over capacity are dropped per expert on the
tokens of one call, split into ``seq_segments`` sequence chunks (the tokens one SP / CP rank routes;
with ``seq_cp`` > 1 the chunks follow context parallelism's zigzag layout, so a CP rank's segment is
its two non-contiguous chunks), so a distributed run reproduces per-rank capacity semantics with the
same model.

The aux and z losses are attached to the block output with an identity autograd function whose
backward feeds d(loss)/d(aux) = 1 (Megatron's MoEAuxLossAutoScaler): the trained objective is
cross-entropy + aux losses, while the forward value stays the cross-entropy, and this works across
pipeline stages. The fx seams are ``route``/``capacity``/``permute_tokens``/``expert_mlp``/
``unpermute_tokens`` (one node each), which a token-dispatcher pass replaces.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from plait.ir.job import MoEOptions
from plait.ir.model import MoE

from . import routing
from .experts import GroupedExperts
from .mlp import FeedForward
from .norms import upcast


def route(logits, expert_bias, top_k, router, pre_softmax, norm_topk, groups, topk_groups,
          scaling_factor, aux_coeff, z_coeff, group_top=0):
    """-> (weights [T,k], indices [T,k], aux + z loss (scalar), tokens per expert [E])."""
    weights, indices, aux_scores = routing.route(
        logits, expert_bias, top_k=top_k, router=router, pre_softmax=pre_softmax, norm_topk=norm_topk,
        groups=groups, topk_groups=topk_groups, scaling_factor=scaling_factor, group_top=group_top)
    counts = routing.tokens_per_expert(indices, logits.shape[1])
    loss = logits.new_zeros(())
    if aux_coeff:
        loss = loss + routing.load_balancing_loss(aux_scores, counts, top_k, aux_coeff)
    if z_coeff:
        loss = loss + routing.z_loss(logits, z_coeff)
    return weights, indices, loss, counts


def capacity(weights, indices, batch, segments, experts, factor, policy, cp=1):
    """Zero the weights of assignments over capacity and mark them with expert id ``experts``
    (a sentinel that permute_tokens drops)."""
    keep = routing.capacity_keep_segments(weights, indices, batch, segments, experts, factor, policy, cp)
    return weights * keep, indices.masked_fill(~keep, experts)


def permute_tokens(x, indices, weights, experts):
    """Sort (token, choice) pairs by expert. -> (x_sorted, counts [E], token index per row,
    weight per row). Assignments to the sentinel expert ``experts`` (dropped) are left out."""
    flat = indices.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=experts + 1)[:experts]
    order = order[: int(counts.sum())]
    token = order // indices.shape[1]
    return x[token], counts, token, weights.flatten()[order]


def unpermute_tokens(y_sorted, token, row_weights, num_tokens):
    """Weighted sum of each token's expert outputs (accumulated in expert order)."""
    y = y_sorted * row_weights.unsqueeze(-1).to(y_sorted.dtype)
    return y.new_zeros(num_tokens, y.shape[-1]).index_add(0, token, y)


class AttachAuxLoss(torch.autograd.Function):
    """Identity on ``out``; backward gives ``aux`` a gradient of 1 (scaled by the caller)."""

    @staticmethod
    def forward(ctx, out, aux):
        ctx.save_for_backward(aux)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        (aux,) = ctx.saved_tensors
        return grad, torch.ones_like(aux)


def attach_aux_loss(out, aux):
    return AttachAuxLoss.apply(out, aux)


for _fn in ("route", "capacity", "permute_tokens", "unpermute_tokens", "attach_aux_loss"):
    torch.fx.wrap(_fn)


def router_logits(router: nn.Linear, flat: torch.Tensor) -> torch.Tensor:
    """Router logits in fp32 whatever the model's dtype (Megatron-Core / HF do the same): the
    weight is upcast too, since FSDP2's mixed precision hands the forward a bf16 copy of it."""
    return F.linear(upcast(flat), upcast(router.weight))


def add_moe_parts(block: nn.Module, spec: MoE, hidden: int, experts: nn.Module) -> None:
    """Register an MoE layer's parts in one order (initialisation draws in this order): the
    router, the (possibly sharded) ``experts``, the aux-loss-free expert bias with its load
    counter, the shared expert and its gate."""
    block.router = nn.Linear(hidden, spec.experts, bias=False)
    block.experts = experts
    if spec.expert_bias:
        block.register_buffer("expert_bias", torch.zeros(spec.experts))
        block.register_buffer("expert_load", torch.zeros(spec.experts), persistent=False)
    if spec.shared_ffn:
        block.shared = FeedForward(hidden, spec.shared_ffn, spec.activation)
    if spec.shared_gate:
        block.shared_gate = nn.Linear(hidden, 1, bias=False)


def add_shared_expert(block: nn.Module, spec: MoE, flat: torch.Tensor, out: torch.Tensor,
                      expert=None) -> torch.Tensor:
    """``out`` plus the shared expert's output on the same tokens, sigmoid-gated when the spec
    says so (Qwen2-MoE). ``expert`` computes the shared expert's output of ``flat`` when that is
    not simply ``block.shared(flat)`` (a tensor-parallel shard, `ExpertParallelMoE`)."""
    if not spec.shared_ffn:
        return out
    shared = (expert or block.shared)(flat)
    if spec.shared_gate:
        shared = torch.sigmoid(block.shared_gate(flat)) * shared
    return out + shared


class MoEBlock(nn.Module):
    fp32_params = ("router.weight", "expert_bias")

    def __init__(self, spec: MoE, hidden: int, options: Optional[MoEOptions] = None, seq_segments: int = 1,
                 seq_cp: int = 1):
        super().__init__()
        options = options or MoEOptions()
        self.spec = spec
        self.capacity_factor = options.capacity_factor
        self.drop_policy = options.drop_policy
        self.seq_segments, self.seq_cp = seq_segments, seq_cp
        add_moe_parts(self, spec, hidden, GroupedExperts(spec.experts, hidden, spec.ffn, spec.activation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        flat = x.reshape(-1, x.shape[-1])
        logits = router_logits(self.router, flat)
        bias = self.expert_bias if s.expert_bias else None
        weights, indices, aux, counts = route(
            logits, bias, s.top_k, s.router, s.pre_softmax, s.norm_topk, s.groups, s.topk_groups,
            s.scaling_factor, s.aux_loss, s.z_loss, group_top=s.group_score_top)
        if s.expert_bias and self.training:
            self.expert_load.add_(counts.detach().float())  # for the aux-loss-free bias update
        if self.capacity_factor is not None:
            weights, indices = capacity(weights, indices, x.shape[0], self.seq_segments, s.experts,
                                        self.capacity_factor, self.drop_policy, self.seq_cp)
        x_sorted, expert_counts, token, row_weights = permute_tokens(flat, indices, weights, s.experts)
        y_sorted = self.experts(x_sorted, expert_counts)
        out = unpermute_tokens(y_sorted, token, row_weights, flat.shape[0]).to(x.dtype)
        out = add_shared_expert(self, s, flat, out)
        if s.aux_loss or s.z_loss:
            out = attach_aux_loss(out, aux)
        return out.view_as(x)


@torch.no_grad()
def update_expert_bias(block: MoEBlock, rate: float, load: Optional[torch.Tensor] = None) -> None:
    """Aux-loss-free balancing step: ``bias += rate * sign(mean(load) - load)``, with ``load`` the
    tokens per expert since the last update (default: what the block counted; a distributed run
    passes the load all-reduced over its data-parallel ranks). Resets the block's counter."""
    load = block.expert_load if load is None else load.to(block.expert_load)
    block.expert_bias += rate * torch.sign(load.mean() - load)
    block.expert_load.zero_()
