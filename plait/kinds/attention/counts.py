"""Attention's counts facet: parameters, FLOPs, saved-activation bytes and FSDP shapes of one
attention block (GQA, multi-head latent attention in latent.py, sliding windows in windows.py).

The counts-facet protocol: every kind's ``plait/kinds/<kind>/counts.py`` defines these, and
``plait.ir.counts`` sums them over a model's layers (it never asks which kind it holds):

    params(model) -> int                      one block's parameters, without its pre-norm
    flops(model, seq_len, causal=True, index=None) -> float
                                              forward FLOPs per token of the index-th layer of the
                                              kind (None: the mean over them)
    recompute_flops(model, seq_len, causal=True) -> float
                                              forward FLOPs per token and layer that selective
                                              recompute re-does
    inactive_params(model) -> int             parameters of one block a token does not use
    fp32_kept_params(model, tp=1) -> float    parameters a bf16 / fp8 model keeps in fp32, per rank
    saved_bytes(model, s) -> dict[str, float] bytes kept for backward per micro-batch, no recompute
                                              (s: counts.ActivationShape), tensor by tensor
    selective_bytes(model, s) -> dict[str, float]   the same under selective recompute
    shapes(model, tp=1, ep=1, etp=1) -> (dense, expert)   tensor shapes on one rank, no pre-norm
    EXPERTS: bool                             its layers hold routed experts (ModelSpec.is_moe)
    EXPORTS: tuple[str, ...]                  the kind's own public names, reachable as
                                              ``plait.ir.counts.<name>``

Imports only ir (data flows one way).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

from plait.ir.counts.activations import (LSE_BYTES, ActivationShape, norm_saved_bytes,
                                         tp_collective_bytes)
from plait.ir.counts.fsdp import Shapes, linear_shapes
from plait.ir.counts.state import FP32_BYTES
from plait.ir.model import Attention, ModelSpec
from plait.kinds import absent

from .latent import latent_gemms, latent_norm_params, latent_widths
from .windows import attended_keys, attention_windows, ring_exchanges, ring_steps  # noqa: F401  (EXPORTS)

EXPERTS = False  # its layers hold routed experts (ModelSpec.is_moe)
EXPORTS = ("attention_gemms", "rotated_width", "attention_gemm_weights", "attention_params",
           "attention_core_flops", "attention_flops", "attention_saved_bytes",
           "attention_selective_bytes", "latent_gemms", "latent_norm_params", "latent_widths",
           "attended_keys", "attention_windows", "ring_exchanges", "ring_steps")


# --- parameters --------------------------------------------------------------------------------

def attention_gemms(attn: Attention, hidden: int, tp: int = 1) -> tuple[tuple[float, float], ...]:
    """(out, in) widths of attention's projection GEMMs per token on one of ``tp`` ranks, o_proj
    last: GQA's fused q/k/v and o, or multi-head latent attention's down / up projections
    (latent.py). The cost model times these same GEMMs."""
    if attn.latent is not None:
        return latent_gemms(attn, hidden, tp)
    return ((attn.q_dim + 2 * attn.kv_dim) / tp, hidden), (hidden, attn.q_dim / tp)


def rotated_width(attn: Attention, tp: int = 1) -> float:
    """Channels RoPE rotates per token on one of ``tp`` ranks: every q and k head (GQA), or MLA's
    rotary part of each q head plus its one rotary key shared by all heads (replicated)."""
    if attn.latent is not None:
        return attn.heads / tp * attn.rope_dim + attn.rope_dim
    return (attn.q_dim + attn.kv_dim) / tp


def attention_gemm_weights(attn: Attention, hidden: int) -> int:
    """Weights of attention's projection GEMMs (one multiply-add each per token)."""
    return int(sum(n_out * n_in for n_out, n_in in attention_gemms(attn, hidden)))


def attention_params(model: ModelSpec, attn: Attention) -> int:
    """Projections (+ biases) and norms inside the block (GQA's per-head q/k norms, MLA's latent
    norms); no pre-norm."""
    h = model.hidden
    biases = (attn.q_dim + 2 * attn.kv_dim if attn.qkv_bias else 0) + (h if attn.out_bias else 0)
    qk_norm = 2 * attn.head_dim if attn.qk_norm else 0  # RMSNorm scales, shared across heads
    latent_norms = latent_norm_params(attn) if attn.latent is not None else 0
    return attention_gemm_weights(attn, h) + biases + qk_norm + latent_norms


def params(model: ModelSpec) -> int:
    return attention_params(model, model.block("attention"))


inactive_params = absent.no_params
fp32_kept_params = absent.no_fp32_params


# --- FLOPs -------------------------------------------------------------------------------------

def attention_core_flops(model: ModelSpec, seq_len: int, causal: bool = True,
                         index: Optional[int] = None) -> float:
    """QK^T and scores x V per token: ``2 * heads * (head_dim + v_head_dim) * keys`` (GQA: 4 * q_dim
    * keys) with ``attended_keys`` keys, of the ``index``-th attention layer, or the mean over the
    attention layers (index None), so that count("attention") * this is their total."""
    attn = model.block("attention")
    if index is not None:
        keys = attended_keys(seq_len, attn.window_of(index), causal)
    else:
        keys = _mean_attended_keys(model, seq_len, causal)
    return 2 * attn.heads * (attn.head_dim + attn.v_head_dim) * keys


@lru_cache(maxsize=256)  # the planner's attention cost asks per layout: a sum over the model's layers
def _mean_attended_keys(model: ModelSpec, seq_len: int, causal: bool) -> float:
    """attended_keys averaged over the model's attention layers."""
    windows = attention_windows(model) or (model.block("attention").window,)
    return sum(attended_keys(seq_len, w, causal) for w in windows) / len(windows)


def attention_flops(model: ModelSpec, seq_len: int, causal: bool = True,
                    index: Optional[int] = None) -> float:
    projections = 2 * attention_gemm_weights(model.block("attention"), model.hidden)
    return projections + attention_core_flops(model, seq_len, causal, index)


flops = attention_flops


def recompute_flops(model: ModelSpec, seq_len: int, causal: bool = True) -> float:
    """Selective recompute re-runs the attention core (Korthikanti et al.)."""
    return attention_core_flops(model, seq_len, causal)


# --- saved activations -------------------------------------------------------------------------

def attention_saved_bytes(model: ModelSpec, s: ActivationShape) -> dict[str, float]:
    """Tensor by tensor, no recompute: the projections' input (the norm output, all tokens of the
    rank), the RoPE tables, q after RoPE, k and v (repeated to every query head when the kernel
    expands them), the core's fp32 log-sum-exp and output (= o_proj's input). Flash attention
    keeps no s x s scores; a stack that does (SC'21 Megatron) is Korthikanti's 5as^2b term."""
    a, t, b, tp = model.block("attention"), s.tokens, s.act_bytes, s.tp
    repeat = a.heads // a.kv_heads if s.kv_expanded else 1
    out = {"norm": norm_saved_bytes(model, s), "input": t * model.hidden * b,
           "q": t * a.q_dim / tp * b, "k": t * a.kv_dim * repeat / tp * b, "v": t * a.v_dim * repeat / tp * b,
           "lse": t * a.heads / tp * LSE_BYTES, "core_out": t * a.out_dim / tp * b}
    if a.rope is not None:
        out["rope"] = 2 * s.seq * a.rope_dim * b
    if a.latent is not None:  # each latent: its RMSNorm's fp32 input and statistics, the cast-back
        # input, and the normalised output the up-projection reads (replicated over TP)
        out["latents"] = sum(t * w * (FP32_BYTES + 2 * b) + t * LSE_BYTES for w in latent_widths(a))
    if a.qk_norm:  # per-head RMSNorms of q and k: fp32 input, statistics, cast-back input
        out["qk_norm"] = t * (a.q_dim + a.kv_dim) / tp * (FP32_BYTES + b) \
            + t * (a.heads + a.kv_heads) / tp * LSE_BYTES
    return out


def attention_selective_bytes(model: ModelSpec, s: ActivationShape) -> dict[str, float]:
    """plait's selective recompute (lowering/recompute.py) keeps the region's input and the
    outputs of matmuls and collectives: q, k, v projections (before RoPE or expansion), o_proj's
    output (a full-token partial sum under TP), and under TP the gathered input (sequence
    parallel) or the all-reduced output."""
    a, t, b, tp = model.block("attention"), s.tokens, s.act_bytes, s.tp
    projections = attention_gemms(a, model.hidden, tp)[:-1]  # every projection output but o_proj's
    out = {"input": s.stream_tokens * model.hidden * b,
           "qkv": t * sum(n_out for n_out, _ in projections) * b, "o_proj": t * model.hidden * b}
    out.update(tp_collective_bytes(model, s))
    return out


saved_bytes, selective_bytes = attention_saved_bytes, attention_selective_bytes


# --- FSDP shapes -------------------------------------------------------------------------------

def shapes(model: ModelSpec, tp: int = 1, ep: int = 1, etp: int = 1) -> tuple[Shapes, Shapes]:
    """GQA: q, k, v column-parallel (with their biases), o row-parallel, o's bias, q/k norms; MLA:
    its GEMMs as lowered (latent.py), no biases, two latent norms. No expert tensors."""
    a, h = model.attention, model.hidden
    if a.latent is not None:
        gemms = tuple((int(n_out), int(n_in)) for n_out, n_in in latent_gemms(a, h, tp))
        return gemms + tuple((w,) for w in latent_widths(a)), ()
    out = (linear_shapes(h, a.q_dim, a.qkv_bias, tp) + linear_shapes(h, a.kv_dim, a.qkv_bias, tp) * 2
           + linear_shapes(a.q_dim, h, False, in_parts=tp) + (((h,),) if a.out_bias else ()))
    return out + (((a.head_dim,),) * 2 if a.qk_norm else ()), ()
