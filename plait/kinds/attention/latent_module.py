"""Multi-head latent attention (DeepSeek-V2/V3), numerically transformers' ``DeepseekV3Attention``:
the attention kind's MLA variant of the reference module (built by this kind's module facet).

Per token: q = q_b(norm(q_a(x))) (or q_proj(x) without a q LoRA rank), split per head into a
no-position part and a rotary part; kv_a_proj_with_mqa(x) gives the kv latent (kv_lora_rank wide)
and one rotary key shared by all heads; kv_b(norm(latent)) expands the latent into each head's
no-position key and value. Keys are [k_nope, shared rotary key], queries [q_nope, rotated q_rope],
and attention is plain causal SDPA (``causal_attention``, the same fx seam as GQA; v heads may be
narrower than q/k heads).

TP-friendly as GQA is: head counts are never stored, per-head tensors are viewed with -1 heads, so
a pass that shards q_proj / q_b_proj / kv_b_proj column-wise by heads and o_proj row-wise, keeping
the latent down-projections (q_a, kv_a) and their norms replicated, needs no other rewrite.
"""
from __future__ import annotations

import torch
import torch.fx
from torch import nn

from plait.ir.model import Attention

from plait.lowering.modules.attention import causal_attention, sequence_positions
from plait.lowering.modules.norms import RMSNorm
from plait.lowering.modules.rotary import apply_rotary, rope_inv_freq, rotary_cos_sin, yarn_mscale

# The same fx seams as GQA (fx.wrap patches the globals of the module that calls it, so this one too).
torch.fx.wrap("sequence_positions")
torch.fx.wrap("causal_attention")

# transformers' DeepSeek-V3 builds q_a_layernorm / kv_a_layernorm with its RMSNorm's default eps,
# not the config's rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def latent_softmax_scale(spec: Attention) -> float:
    """1 / sqrt(q/k head dim), times YaRN's mscale(mscale_all_dim)^2 when the rope sets it."""
    scale = spec.head_dim ** -0.5
    s = spec.rope.scaling if spec.rope is not None else None
    if s is not None and s.mscale_all_dim:
        scale *= yarn_mscale(s.factor, s.mscale_all_dim) ** 2
    return scale


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """Adjacent rotary pairs (x0, x1), (x2, x3), ... -> the rotate-half layout [x0, x2, ..., x1, x3, ...]
    (applied to q and k alike, so their dot products are those of DeepSeek's interleaved rotation)."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


class LatentAttention(nn.Module):
    fp32_params = ("inv_freq",)

    def __init__(self, spec: Attention, hidden: int, norm_eps: float, max_seq: int | None):
        super().__init__()
        lat = spec.latent
        if spec.full_layers:
            raise ValueError("build each attention layer from spec.layer_block(i): its own window")
        self.nope_dim, self.rope_dim, self.v_dim = lat.qk_nope_head_dim, lat.qk_rope_head_dim, lat.v_head_dim
        self.kv_rank, self.interleave, self.window = lat.kv_lora_rank, lat.rope_interleave, spec.window
        q_out = spec.heads * lat.qk_head_dim
        self.has_q_lora = lat.q_lora_rank is not None
        if self.has_q_lora:
            self.q_a_proj = nn.Linear(hidden, lat.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(lat.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(lat.q_lora_rank, q_out, bias=False)
        else:
            self.q_proj = nn.Linear(hidden, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, lat.kv_lora_rank + lat.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(lat.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(lat.kv_lora_rank, spec.heads * (lat.qk_nope_head_dim + lat.v_head_dim),
                                   bias=False)
        self.o_proj = nn.Linear(spec.heads * lat.v_head_dim, hidden, bias=False)
        self.scale = latent_softmax_scale(spec)
        inv_freq, self.attention_scaling = rope_inv_freq(spec.rope, lat.qk_rope_head_dim, max_seq)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.has_q_lora else self.q_proj(x)
        return q.view(x.shape[0], x.shape[1], -1, self.nope_dim + self.rope_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s = x.shape[0], x.shape[1]
        q_nope, q_rot = self.queries(x).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(b, s, -1, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_rot = k_rot.unsqueeze(2)  # one rotary key for all heads
        if self.interleave:
            q_rot, k_rot = deinterleave(q_rot), deinterleave(k_rot)
        cos, sin = rotary_cos_sin(sequence_positions(x), self.inv_freq, self.attention_scaling, q_rot.dtype)
        q = torch.cat((q_nope, apply_rotary(q_rot, cos, sin)), dim=-1)
        k_rot = apply_rotary(k_rot, cos, sin).expand(-1, -1, k_nope.shape[2], -1)
        k = torch.cat((k_nope, k_rot), dim=-1)
        if self.window is None:
            out = causal_attention(q, k, v, self.scale)
        else:
            out = causal_attention(q, k, v, self.scale, window=self.window)
        return self.o_proj(out.reshape(b, s, -1))
