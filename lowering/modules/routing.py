"""MoE routing: scores, top-k selection, capacity dropping, and the load-balancing losses.

Conventions follow Megatron-Core's router:
  * softmax router, ``pre_softmax=False``: top-k of the logits, softmax over the chosen k;
    ``pre_softmax=True``: softmax over all experts, top-k, renormalised when ``norm_topk``.
  * sigmoid router: scores = sigmoid(logits); the expert bias (aux-loss-free balancing) is added to
    the scores used to *choose* experts only; weights are the unbiased scores, renormalised over the
    k chosen when ``norm_topk`` (denominator + 1e-20).
  * group-limited routing: experts split in ``groups``; a group's score is the sum of its best
    ``group_top`` choice scores (default ``top_k // topk_groups``, Megatron-Core; transformers'
    DeepSeek-V3 always sums 2); only the best ``topk_groups`` groups are eligible.
  * weights are multiplied by ``scaling_factor``; the router runs in fp32.
  * aux loss (Switch / Megatron): coeff * E / (k * T^2) * sum_e(sum_t p[t,e] * n_e), with p the
    softmax probabilities (sigmoid: scores normalised per token) and n_e the tokens routed to e
    before any capacity drop; z-loss: coeff * mean_t(logsumexp(logits_t)^2).
  * capacity (optional): ceil(T * k / E * factor) per expert over the T tokens routed together;
    ``probs`` keeps each expert's highest-weight tokens, ``position`` its earliest tokens in the
    flattened [batch, seq] order.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from plait.ir import legality
from plait.lowering.cp_ops import zigzag_order


def select_experts(choice: torch.Tensor, top_k: int, groups: int = 1, topk_groups: int = 1,
                   group_top: int = 0) -> torch.Tensor:
    """Indices [T, k] of the chosen experts given choice scores [T, E]."""
    if groups > 1:
        t, e = choice.shape
        per_group = choice.view(t, groups, e // groups)
        group_scores = per_group.topk(group_top or top_k // topk_groups, dim=-1).values.sum(-1)
        best = group_scores.topk(topk_groups, dim=-1).indices
        eligible = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, best, True)
        choice = choice.masked_fill(~eligible.repeat_interleave(e // groups, dim=1), float("-inf"))
    return choice.topk(top_k, dim=-1).indices


def route(logits: torch.Tensor, expert_bias, *, top_k: int, router: str, pre_softmax: bool,
          norm_topk: bool, groups: int, topk_groups: int, scaling_factor: float,
          group_top: int = 0) -> tuple:
    """logits [T, E] (fp32) -> (weights [T, k], indices [T, k], aux_scores [T, E])."""
    if router == "softmax":
        probs = torch.softmax(logits, dim=-1)
        if pre_softmax:
            choice = probs if expert_bias is None else probs + expert_bias
            indices = select_experts(choice, top_k, groups, topk_groups, group_top)
            weights = probs.gather(1, indices)
            if norm_topk:
                weights = weights / weights.sum(-1, keepdim=True)
        else:
            choice = logits if expert_bias is None else logits + expert_bias
            indices = select_experts(choice, top_k, groups, topk_groups, group_top)
            weights = torch.softmax(logits.gather(1, indices), dim=-1)
        aux_scores = probs
    elif router == "sigmoid":
        scores = torch.sigmoid(logits)
        choice = scores if expert_bias is None else scores + expert_bias
        indices = select_experts(choice, top_k, groups, topk_groups, group_top)
        weights = scores.gather(1, indices)
        if norm_topk and top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        aux_scores = scores / (scores.sum(-1, keepdim=True) + 1e-20)
    else:
        raise ValueError(f"unknown router {router!r}")
    return weights * scaling_factor, indices, aux_scores


def tokens_per_expert(indices: torch.Tensor, experts: int) -> torch.Tensor:
    return torch.bincount(indices.flatten(), minlength=experts)


def load_balancing_loss(aux_scores: torch.Tensor, counts: torch.Tensor, top_k: int, coeff: float) -> torch.Tensor:
    """Switch / Megatron aux loss over the T tokens of ``aux_scores`` [T, E]."""
    t, e = aux_scores.shape
    return (aux_scores.sum(0) * counts.to(aux_scores.dtype)).sum() * (coeff * e / (top_k * t * t))


def z_loss(logits: torch.Tensor, coeff: float) -> torch.Tensor:
    return torch.logsumexp(logits, dim=-1).square().mean() * coeff


def expert_capacity(tokens: int, top_k: int, experts: int, factor: float) -> int:
    return math.ceil(tokens * top_k / experts * factor)


def capacity_keep(weights: torch.Tensor, indices: torch.Tensor, experts: int, factor: float,
                  policy: str) -> torch.Tensor:
    """Bool [T, k]: which (token, choice) assignments survive the per-expert capacity, computed on
    the T tokens given (one rank's local tokens)."""
    t = indices.shape[0]
    capacity = expert_capacity(t, indices.shape[1], experts, factor)
    routed = torch.zeros(t, experts, dtype=torch.bool, device=indices.device).scatter(1, indices, True)
    if policy == "position":
        kept = routed & (routed.long().cumsum(0) <= capacity)
    elif policy == "probs":
        dense = torch.zeros(t, experts, dtype=weights.dtype, device=weights.device).scatter(1, indices, weights)
        dense = dense.masked_fill(~routed, float("-inf"))
        best = dense.topk(min(capacity, t), dim=0).indices
        kept = routed & torch.zeros_like(routed).scatter(0, best, True)
    else:
        raise ValueError(f"unknown drop policy {policy!r}")
    return kept.gather(1, indices)


def capacity_keep_segments(weights: torch.Tensor, indices: torch.Tensor, batch: int, segments: int,
                           experts: int, factor: float, policy: str, cp: int = 1) -> torch.Tensor:
    """``capacity_keep`` applied separately to each of ``segments`` equal sequence chunks: the tokens
    one sequence- / context-parallel rank holds, each chunk in that rank's [b, s_local] order.

    ``cp`` > 1: the sequence is first put in context parallelism's zigzag order (2*cp chunks, CP
    rank r holding chunks r and 2*cp-1-r next to each other, see `plait.lowering.cp_ops`), then cut
    into the ``segments`` (a multiple of cp) pieces: piece i is what CP rank i // (segments / cp)
    and, under sequence parallelism, TP rank i % (segments / cp) route. So a CP rank's capacity
    covers its two non-contiguous chunks together, as each rank computes it on its local tokens."""
    if segments == 1:
        return capacity_keep(weights, indices, experts, factor, policy)
    if segments % cp:
        raise ValueError(f"{segments} capacity segments cannot be split over cp = {cp}")
    k = indices.shape[1]
    order = zigzag_sequence_order(weights.shape[0] // batch, cp, device=indices.device)

    def chunks(x):  # [b*s, k] -> [segments, b*s/segments, k], each chunk in its own [b, s/n] order
        x = x.view(batch, -1, k)[:, order]
        return x.view(batch, segments, -1, k).transpose(0, 1).reshape(segments, -1, k)
    kept = torch.stack([capacity_keep(w, i, experts, factor, policy)
                        for w, i in zip(chunks(weights), chunks(indices))])
    kept = kept.view(segments, batch, -1, k).transpose(0, 1).reshape(batch, -1, k)
    return torch.empty_like(kept).index_copy_(1, order, kept).view(-1, k)  # back to natural order


def zigzag_sequence_order(seq: int, cp: int, device=None) -> torch.Tensor:
    """Positions of a length-``seq`` sequence in the order CP ranks 0..cp-1 hold them (identity
    for cp = 1)."""
    if cp == 1:
        return torch.arange(seq, device=device)
    problem = legality.zigzag_chunks(seq, cp)
    if problem:
        raise ValueError(problem)
    chunk = seq // (2 * cp)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in zigzag_order(cp)])
