"""Multi-head latent attention (DeepSeek-V2/V3) in attention's counts facet: the weights of its
projection GEMMs and its extra norms, and the activation width it keeps per token.

Per layer, with H heads, qk = qk_nope + qk_rope, hidden d:
  q:   d x q_rank + q_rank x H*qk   (q_lora_rank set; q_a_layernorm adds q_rank scales)
       d x H*qk                      (no q LoRA: DeepSeek-V2-Lite)
  kv:  d x (kv_rank + qk_rope)       kv_a_proj_with_mqa: the latent and the shared rotary key
       kv_rank x H*(qk_nope + v)     kv_b_proj: each head's key (no-position part) and value
       (kv_a_layernorm adds kv_rank scales)
  o:   H*v x d
Unlike GQA, a q/k head (qk) and a v head (v) differ in width, so the attention core costs
2*H*(qk + v) FLOPs per attended key rather than 4*q_dim.
"""
from __future__ import annotations

from plait.ir.model import Attention


def latent_gemms(attn: Attention, hidden: int, tp: int = 1) -> tuple[tuple[float, float], ...]:
    """(out, in) widths of each projection GEMM on one of ``tp`` ranks: the per-head up-projections
    and o_proj split by heads, the latent down-projections replicated (Megatron-Core's MLA)."""
    lat, heads = attn.latent, attn.heads / tp
    if lat.q_lora_rank is None:
        q = ((heads * lat.qk_head_dim, hidden),)
    else:
        q = ((lat.q_lora_rank, hidden), (heads * lat.qk_head_dim, lat.q_lora_rank))
    kv = ((lat.kv_lora_rank + lat.qk_rope_head_dim, hidden),
          (heads * (lat.qk_nope_head_dim + lat.v_head_dim), lat.kv_lora_rank))
    return q + kv + ((hidden, heads * lat.v_head_dim),)


def latent_widths(attn: Attention) -> tuple[int, ...]:
    """The normalised latents per token: q's (when it has a LoRA rank) and kv's."""
    lat = attn.latent
    return (lat.kv_lora_rank,) if lat.q_lora_rank is None else (lat.q_lora_rank, lat.kv_lora_rank)


def latent_norm_params(attn: Attention) -> int:
    """Scales of q_a_layernorm (when q has a LoRA rank) and kv_a_layernorm."""
    lat = attn.latent
    return lat.kv_lora_rank + (lat.q_lora_rank or 0)
