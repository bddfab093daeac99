"""Vocabulary-parallel embedding and cross entropy (Megatron's), composed from torch ops and the
`plait::` collectives, so they stay traceable and differentiate correctly under autograd.

The tensor-parallel pass inserts calls to these functions into graphs; each TP rank holds rows
[vocab_start, vocab_start + V/tp) of the embedding / LM head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from plait.lowering import collectives  # noqa: F401  (registers the torch.ops.plait ops)


def vocab_parallel_embedding(tokens: torch.Tensor, weight: torch.Tensor,
                             vocab_start: int) -> torch.Tensor:
    """This rank's partial embedding: rows it holds, zeros for tokens outside its slice (the TP
    reduction after it completes the lookup)."""
    local = tokens - vocab_start
    inside = (local >= 0) & (local < weight.shape[0])
    out = F.embedding(torch.where(inside, local, torch.zeros_like(local)), weight)
    return out * inside.unsqueeze(-1).to(out.dtype)


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int,
                                 axis: str, size: int, reduction: str = "mean") -> torch.Tensor:
    """Mean (or per-token: reduction "none") cross entropy of logits split over the vocabulary:
    logits [N, V/tp] (this rank's columns), labels [N] global ids. Equals F.cross_entropy on the
    gathered logits; a label outside the vocabulary (the ignore index) matches no column, and the
    loss-masked model zeroes that token's loss itself (torch.where)."""
    # The max only stabilises exp(); it carries no gradient.
    row_max = torch.ops.plait.max_over(logits.detach().amax(dim=-1), axis, size)
    shifted = logits - row_max.unsqueeze(-1)
    local = labels - vocab_start
    inside = (local >= 0) & (local < logits.shape[-1])
    index = torch.where(inside, local, torch.zeros_like(local)).unsqueeze(-1)
    picked = shifted.gather(-1, index).squeeze(-1) * inside.to(shifted.dtype)
    # the sum of exp() and the label's logit, completed over TP in one all-reduce (not two)
    both = torch.stack((shifted.exp().sum(dim=-1), picked))
    sum_exp, target = torch.ops.plait.reduce_from_tp(both, axis, size).unbind(0)
    per_token = sum_exp.log() - target
    return per_token if reduction == "none" else per_token.mean()
