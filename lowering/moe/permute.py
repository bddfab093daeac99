"""Permute tokens by expert and back, with capacity dropping and optional padding to capacity.

Routing gives each token ``k`` (expert, weight) choices. ``permute`` lays the surviving choices out
as rows sorted by expert (stable: each expert's rows in token order) and ``unpermute`` adds each
row's weighted output back onto its token. A choice marked with the sentinel expert id
``experts`` (dropped over capacity, or not this rank's expert) gets no row.

Padding to capacity gives every expert exactly ``pad_to`` rows: the extra rows are zeros with
weight zero, so they change no output and no gradient, and every all-to-all split is known in
advance. Drop decisions themselves are `plait.lowering.modules.routing.capacity_keep`, the
reference model's own rule, applied to the tokens this rank holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from plait.lowering.modules import routing


@dataclass(frozen=True)
class Permutation:
    """Where the rows of a permuted batch came from."""

    token: torch.Tensor  # [R] source token of each row; ``num_tokens`` marks a padding row
    weight: torch.Tensor  # [R] routing weight of each row (0 on padding rows)
    counts: torch.Tensor  # [E] rows per expert (incl. padding)
    num_tokens: int


def drop_over_capacity(weights: torch.Tensor, indices: torch.Tensor, experts: int, factor: float,
                       policy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Capacity ceil(T k / E * factor) per expert over the T tokens given (this rank's): dropped
    choices get weight 0 and the sentinel expert id ``experts``."""
    keep = routing.capacity_keep(weights, indices, experts, factor, policy)
    return weights * keep, indices.masked_fill(~keep, experts)


def permute(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: int,
            pad_to: Optional[int] = None) -> tuple[torch.Tensor, Permutation]:
    """x [T, H], indices / weights [T, k] (sentinel ``experts`` = no row) -> (rows [R, H] sorted
    by expert, Permutation). With ``pad_to`` every expert gets exactly that many rows."""
    t, k = indices.shape
    flat = indices.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=experts + 1)[:experts]
    order = order[: int(counts.sum())]
    token, weight = order // k, weights.flatten()[order]
    if pad_to is not None:
        token, weight, counts = _pad(token, weight, counts, pad_to, t)
    padded = torch.cat([x, x.new_zeros(1, x.shape[-1])]) if pad_to is not None else x
    return padded[token], Permutation(token=token, weight=weight, counts=counts, num_tokens=t)


def _pad(token, weight, counts, pad_to: int, num_tokens: int):
    """Place expert e's rows at [e * pad_to, e * pad_to + counts[e]); the rest point at the zero
    row ``num_tokens`` with weight 0."""
    if counts.numel() and int(counts.max()) > pad_to:
        raise ValueError(f"an expert holds {int(counts.max())} rows, more than the capacity {pad_to}")
    experts = counts.numel()
    starts = torch.cumsum(counts, 0) - counts
    expert_of_row = torch.repeat_interleave(torch.arange(experts), counts)
    slot = expert_of_row * pad_to + (torch.arange(token.numel()) - starts[expert_of_row])
    padded_token = torch.full((experts * pad_to,), num_tokens, dtype=token.dtype)
    padded_weight = weight.new_zeros(experts * pad_to)
    padded_token[slot] = token
    padded_weight = padded_weight.index_put((slot,), weight)
    return padded_token, padded_weight, torch.full_like(counts, pad_to)


def unpermute(rows: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """rows [R, H] (expert outputs in permuted order) -> [T, H]: sum of weight * row per token."""
    weighted = rows * perm.weight.unsqueeze(-1).to(rows.dtype)
    out = rows.new_zeros(perm.num_tokens + 1, rows.shape[-1]).index_add(0, perm.token, weighted)
    return out[: perm.num_tokens]
