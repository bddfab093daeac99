"""Self-attention mixer: GQA with optional RoPE, qkv / out biases, Qwen3's per-head q/k RMSNorm and
an optional sliding window (Mistral, Qwen2: query i sees keys j with 0 <= i - j < window).

TP-friendly by construction: head counts are never stored; projections are reshaped with -1 heads
of ``head_dim`` and the GQA repetition is derived from tensor shapes inside ``causal_attention``, so a
pass that shards q/k/v_proj column-wise and o_proj row-wise needs no other rewrite.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from plait.ir.model import Attention

from .norms import RMSNorm
from .rotary import apply_rotary, rope_inv_freq, rotary_cos_sin


def sequence_positions(x: torch.Tensor) -> torch.Tensor:
    """Positions 0..s-1 along dim 1 of ``x``. One fx node (wrapped below), so a context-parallel pass
    can replace it with the positions of the chunks its rank holds."""
    return torch.arange(x.shape[1], device=x.device)


def band_mask(sq: int, sk: int, offset: int, window: Optional[int], device=None) -> torch.Tensor:
    """[sq, sk] bool, True where query i sees key j: 0 <= offset + i - j < window (no upper
    bound without a window). ``offset`` is the first query's position minus the first key's."""
    distance = (offset + torch.arange(sq, device=device)[:, None]) - torch.arange(sk, device=device)
    visible = distance >= 0
    return visible if window is None else visible & (distance < window)


def _heads_first(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """[b, s, h, d] -> [b, h, s, d] for SDPA, each kv head repeated for the hq // hkv query heads it
    serves (read from the shapes, so it holds for any TP shard)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    repeat = q.shape[1] // k.shape[1]
    if repeat > 1:
        k = k.repeat_interleave(repeat, dim=1)
        v = v.repeat_interleave(repeat, dim=1)
    return q, k, v


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     window: Optional[int] = None) -> torch.Tensor:
    """q: [b, s, hq, d], k/v: [b, s, hkv, d] -> [b, s, hq, d]. Causal SDPA, within ``window`` keys
    when given (a banded boolean mask); each kv head serves hq // hkv query heads (read from the
    shapes, so it holds for any TP shard). One fx node, so the kernel registry or a
    context-parallel pass can swap the implementation."""
    q, k, v = _heads_first(q, k, v)
    s = q.shape[2]
    if window is None or window >= s:  # the window covers every causal key: plain causal
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        mask = band_mask(s, s, 0, window, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       documents: torch.Tensor, window: Optional[int] = None) -> torch.Tensor:
    """Causal attention within packed documents: query i sees key j iff j <= i (and i - j <
    ``window`` when given) and ``documents[:, i] == documents[:, j]`` (a block-diagonal causal
    mask: no attention across the documents packed into one sequence). q [b, s, hq, d], k/v
    [b, s, hkv, d], documents [b, s] (any key shared by the tokens of one document). SDPA with a
    boolean mask; the kernel registry binds flash-attn's varlen kernel on CUDA. One fx node, like
    causal_attention."""
    q, k, v = _heads_first(q, k, v)
    s = q.shape[2]
    mask = (documents[:, :, None] == documents[:, None, :]) & band_mask(s, s, 0, window, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale)
    return out.transpose(1, 2)


torch.fx.wrap("sequence_positions")
torch.fx.wrap("causal_attention")
torch.fx.wrap("document_attention")


class SelfAttention(nn.Module):
    fp32_params = ("inv_freq",)  # RoPE frequencies stay fp32 in a bf16 model
    reads_positions = True  # a document-masked model passes each token's position in its document

    def __init__(self, spec: Attention, hidden: int, norm_eps: float, max_seq: int | None):
        super().__init__()
        self.head_dim = spec.head_dim
        self.scale = spec.head_dim ** -0.5
        self.q_proj = nn.Linear(hidden, spec.q_dim, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(hidden, spec.kv_dim, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(hidden, spec.kv_dim, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(spec.q_dim, hidden, bias=spec.out_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, norm_eps)
        self.qk_norm = spec.qk_norm
        if spec.full_layers:
            raise ValueError("build each attention layer from spec.layer_block(i): its own window")
        self.window = spec.window
        self.has_rope = spec.rope is not None
        if self.has_rope:
            inv_freq, self.attention_scaling = rope_inv_freq(spec.rope, spec.head_dim, max_seq)
            self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``positions`` [b, s]: each token's position within its packed document (0 at a
        document's first token, Megatron's reset_position_ids). Given, RoPE reads them and
        attention stays inside documents; the tokens of one document share the key
        index - position (its first token's index), which holds on any CP shard of the sequence
        because ``sequence_positions`` becomes the shard's global indices there."""
        b, s = x.shape[0], x.shape[1]
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        k = self.k_proj(x).view(b, s, -1, self.head_dim)
        v = self.v_proj(x).view(b, s, -1, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        index = sequence_positions(x) if (self.has_rope or positions is not None) else None
        if self.has_rope:
            where = index if positions is None else positions
            cos, sin = rotary_cos_sin(where, self.inv_freq, self.attention_scaling, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if positions is not None:  # packed documents: keyword window, as below
            out = document_attention(q, k, v, self.scale, index - positions, window=self.window)
        elif self.window is None:
            out = causal_attention(q, k, v, self.scale)
        else:  # a keyword, so a pass that swaps the node keeps it whatever the positional arguments
            out = causal_attention(q, k, v, self.scale, window=self.window)
        return self.o_proj(out.reshape(b, s, -1))
