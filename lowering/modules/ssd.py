"""Mamba2's selective state-space scan in pure PyTorch: the chunked SSD algorithm (Dao & Gu 2024,
"Transformers are SSMs") and the sequential recurrence it must equal.

Shapes: x [b, s, h, p]; dt [b, s, h] (after bias, softplus); A [h] (negative); B, C [b, s, g, n]
with head i reading group i // (h / g). Output y [b, s, h, p], without the D skip. Computed in fp32 (or fp64 for fp64 inputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from plait.lowering.recompute import opaque_to_selective

from .norms import upcast


def heads_from_groups(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, s, g, n] -> [b, s, h, n]: each group's B / C shared by h / g consecutive heads."""
    return t.repeat_interleave(heads // t.shape[2], dim=2)


def ssd_sequential(x, dt, A, B, C):
    """The recurrence, one step per position:
    S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T;  y_t = S_t C_t."""
    b, s, h, p = x.shape
    x, dt = upcast(x), upcast(dt)
    B, C = heads_from_groups(upcast(B), h), heads_from_groups(upcast(C), h)
    state = x.new_zeros(b, h, p, B.shape[-1])
    ys = []
    for t in range(s):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = state * decay + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    return torch.stack(ys, dim=1)


def segment_sums(a: torch.Tensor) -> torch.Tensor:
    """a [..., l] -> [..., l, l] with out[i, j] = a[j+1] + ... + a[i] for i >= j, -inf above the
    diagonal (so exp() gives the causal decay matrix). Built from masked cumulative sums of a
    repeated row rather than differences of one cumsum, which lose precision."""
    l = a.shape[-1]
    strict = torch.tril(torch.ones(l, l, dtype=torch.bool, device=a.device), diagonal=-1)
    sums = a[..., None, :].expand(*a.shape, l).transpose(-1, -2).masked_fill(~strict, 0).cumsum(-2)
    causal = torch.tril(torch.ones(l, l, dtype=torch.bool, device=a.device))
    return sums.masked_fill(~causal, float("-inf"))


def _to_chunks(t: torch.Tensor, chunk: int) -> torch.Tensor:
    """[b, s, ...] (s a multiple of chunk) -> [b, s/chunk, chunk, ...]."""
    return t.reshape(t.shape[0], -1, chunk, *t.shape[2:])


def ssd_chunked(x, dt, A, B, C, chunk: int):
    """The SSD chunked scan: exact attention-like products inside each chunk, a recurrence over
    chunk states between chunks. Equal to ``ssd_sequential`` up to rounding."""
    b, s, h, p = x.shape
    pad = (-s) % chunk
    x, dt = upcast(x), upcast(dt)
    B, C = heads_from_groups(upcast(B), h), heads_from_groups(upcast(C), h)
    if pad:  # zero dt on padding: no decay, no input; the padded outputs are dropped
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    xs = _to_chunks(x * dt[..., None], chunk)                        # [b, c, l, h, p]
    a = _to_chunks(dt * A, chunk).permute(0, 3, 1, 2)                # [b, h, c, l]
    B, C = _to_chunks(B, chunk), _to_chunks(C, chunk)                # [b, c, l, h, n]
    a_cum = a.cumsum(-1)

    # 1. within each chunk: y_i = sum_{j<=i} (C_i . B_j) exp(a_{j+1..i}) xs_j
    decay = torch.exp(segment_sums(a))                                # [b, h, c, l, l]
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * decay
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, xs)

    # 2. the state each chunk leaves behind, from its own inputs only
    to_end = torch.exp(a_cum[..., -1:] - a_cum)                       # [b, h, c, l]
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, to_end, xs)

    # 3. carry states across chunks: the state entering chunk c sums earlier chunks' states,
    #    each decayed by the chunk totals in between
    totals = F.pad(a_cum[..., -1], (1, 0))                            # [b, h, c+1]
    carry = torch.exp(segment_sums(totals))                           # [b, h, c+1, c+1]
    states = torch.cat([torch.zeros_like(chunk_states[:, :1]), chunk_states], dim=1)
    entering = torch.einsum("bhzc,bchpn->bzhpn", carry, states)[:, :-1]

    # 4. each position reads the entering state, decayed to its position
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, entering, torch.exp(a_cum))
    return (y_diag + y_off).reshape(b, -1, h, p)[:, :s]


def ssd_chunked_recomputed(x, dt, A, B, C, chunk: int):
    """``ssd_chunked`` keeping only its inputs for backward and recomputing the rest there, as
    mamba-ssm's fused scan does: the intra-chunk decay and score matrices ([b, h, c, l, l] each)
    and einsum's copies would otherwise be kept, about three times the rest of the layer's
    activations. Same values and gradients as ``ssd_chunked`` (the recompute repeats the same ops)."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (x, dt, A, B, C)):
        return ssd_chunked(x, dt, A, B, C, chunk)
    with opaque_to_selective():
        return torch.utils.checkpoint.checkpoint(ssd_chunked, x, dt, A, B, C, chunk, use_reentrant=False)
