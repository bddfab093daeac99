"""Activation bytes: what one rank's layer keeps for backward per micro-batch, tensor by tensor as
the reference modules (lowering/modules) save them; the memory model (planner/cost/memory.py) and
the memory-truth tests (tests/runtime/test_memory_truth.py) read them from here."""
from __future__ import annotations

from dataclasses import dataclass

from plait.ir.model import ModelSpec

from . import _FP32, attention_gemms, latent_widths

_LSE_BYTES = _FP32  # attention log-sum-exp and norm statistics are fp32


@dataclass(frozen=True)
class ActivationShape:
    """What a layer on one rank sees per micro-batch. ``tokens``: tokens through its GEMMs
    (mbs * seq / cp); ``seq``: the rank's sequence length (seq / cp, for RoPE tables); with
    sequence parallelism the residual stream holds tokens / tp of them. ``kv_expanded``: the
    attention kernel repeats K/V to every query head before the core (PyTorch SDPA fallback;
    flash-attention reads grouped K/V as they are)."""

    tokens: float
    seq: float
    tp: int
    sp: bool
    act_bytes: int  # bytes of one activation element: 2 (bf16) or 4 (fp32)
    kv_expanded: bool = False
    etp: int = 1
    routed_tokens: float = 0.0  # MoE: token copies through this rank's experts (load included)

    @property
    def stream_tokens(self) -> float:
        return self.tokens / self.tp if self.sp else self.tokens


def norm_saved_bytes(model: ModelSpec, s: ActivationShape) -> float:
    """A pre-norm over the rank's residual stream. RMSNorm (plait's, computed in fp32): the fp32
    input, the fp32 inverse rms and the normalised input cast back to the activation dtype (for
    the scale's gradient). LayerNorm (torch's): its input, fp32 mean and inverse std. The norm's
    output is counted by the layer that consumes it (gathered over TP with sequence parallel)."""
    stream = s.stream_tokens * model.hidden
    if model.norm.kind == "layernorm":
        return stream * s.act_bytes + 2 * s.stream_tokens * _LSE_BYTES
    return stream * (_FP32 + s.act_bytes) + s.stream_tokens * _LSE_BYTES


def attention_saved_bytes(model: ModelSpec, s: ActivationShape) -> dict[str, float]:
    """Tensor by tensor, no recompute: the projections' input (the norm output, all tokens of the
    rank), the RoPE tables, q after RoPE, k and v (repeated to every query head when the kernel
    expands them), the core's fp32 log-sum-exp and output (= o_proj's input). Flash attention
    keeps no s x s scores; a stack that does (SC'21 Megatron) is Korthikanti's 5as^2b term."""
    a, t, b, tp = model.block("attention"), s.tokens, s.act_bytes, s.tp
    repeat = a.heads // a.kv_heads if s.kv_expanded else 1
    out = {"norm": norm_saved_bytes(model, s), "input": t * model.hidden * b,
           "q": t * a.q_dim / tp * b, "k": t * a.kv_dim * repeat / tp * b, "v": t * a.v_dim * repeat / tp * b,
           "lse": t * a.heads / tp * _LSE_BYTES, "core_out": t * a.out_dim / tp * b}
    if a.rope is not None:
        out["rope"] = 2 * s.seq * a.rope_dim * b
    if a.latent is not None:  # each latent: its RMSNorm's fp32 input and statistics, the cast-back
        # input, and the normalised output the up-projection reads (replicated over TP)
        out["latents"] = sum(t * w * (_FP32 + 2 * b) + t * _LSE_BYTES for w in latent_widths(a))
    if a.qk_norm:  # per-head RMSNorms of q and k: fp32 input, statistics, cast-back input
        out["qk_norm"] = t * (a.q_dim + a.kv_dim) / tp * (_FP32 + b) \
            + t * (a.heads + a.kv_heads) / tp * _LSE_BYTES
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
    out.update(_tp_collectives(model, s))
    return out


def _tp_collectives(model: ModelSpec, s: ActivationShape) -> dict[str, float]:
    if s.tp == 1:
        return {}
    full = s.tokens * model.hidden * s.act_bytes
    if s.sp:  # all-gather of the norm output in, reduce-scatter out
        return {"gathered": full, "scattered": full / s.tp}
    return {"all_reduced": full}


def _ffn_saved(tokens: float, width: float, gated: bool, b: int) -> float:
    """Gated (SwiGLU): gate and up outputs, silu(gate) and the product (down's input). Plain
    (GELU, ReLU²): the up output (or relu's) and the activation output (down's input)."""
    return tokens * width * b * (4 if gated else 2)


def mlp_saved_bytes(model: ModelSpec, s: ActivationShape) -> dict[str, float]:
    mlp = model.block("mlp")
    return {"norm": norm_saved_bytes(model, s), "input": s.tokens * model.hidden * s.act_bytes,
            "ffn": _ffn_saved(s.tokens, mlp.ffn / s.tp, mlp.gated, s.act_bytes)}


def mlp_selective_bytes(model: ModelSpec, s: ActivationShape) -> dict[str, float]:
    """Kept under selective recompute: the input, the up (and gate) and down matmul outputs and
    the TP collectives."""
    mlp, t, b = model.block("mlp"), s.tokens, s.act_bytes
    out = {"input": s.stream_tokens * model.hidden * b,
           "up": t * mlp.ffn / s.tp * b * (2 if mlp.gated else 1), "down": t * model.hidden * b}
    out.update(_tp_collectives(model, s))
    return out


def moe_saved_bytes(model: ModelSpec, s: ActivationShape) -> dict[str, float]:
    """Router logits and probabilities (fp32), the dispatched token copies (= the experts' fc1
    input), the experts' FFN tensors (etp-sharded width over the tokens their shard receives),
    the experts' output (weighted in the combine), the shared expert."""
    moe, h, b = model.block("moe"), model.hidden, s.act_bytes
    copies = s.routed_tokens
    out = {"norm": norm_saved_bytes(model, s), "input": s.tokens * h * b,
           "router": s.tokens / s.tp * moe.experts * _FP32 * 2, "dispatched": copies * h * b,
           "experts": _ffn_saved(copies, moe.ffn / s.etp, moe.gated, b),
           "expert_out": copies * h * b}
    if moe.shared_ffn:
        out["shared"] = _ffn_saved(s.tokens, moe.shared_ffn / s.tp, moe.gated, b)
    return out


def moe_selective_bytes(model: ModelSpec, s: ActivationShape) -> dict[str, float]:
    """Kept under selective recompute: everything but the norm and the activation functions'
    outputs (the grouped GEMMs' and the dispatch's outputs stay)."""
    moe, b = model.block("moe"), s.act_bytes
    out = dict(moe_saved_bytes(model, s))
    out.pop("norm")
    out["input"] = s.stream_tokens * model.hidden * b
    out["experts"] = _ffn_saved(s.routed_tokens, moe.ffn / s.etp, moe.gated, b) / 2
    if moe.shared_ffn:
        out["shared"] = _ffn_saved(s.tokens, moe.shared_ffn / s.tp, moe.gated, b) / 2
    return out


def mamba_saved_bytes(model: ModelSpec, s: ActivationShape) -> dict[str, float]:
    """Tensor by tensor (lowering/modules/mamba.py, no recompute): in_proj's input and output, the
    conv's padded input, pre-activation and output (x, B, C are views of it), dt before and after
    softplus (and the dt floor's output), fp32 upcasts where the activations are narrower, and the
    gated norm's tensors: its fp32 input, silu(z), the product, the group statistics and the
    normalised output before and after the scale (out_proj's input). The scan keeps only its inputs
    (it recomputes its chunk matrices in backward, as mamba-ssm's fused scan does)."""
    m, t, b, tp = model.block("mamba"), s.tokens, s.act_bytes, s.tp
    inner, channels, heads = m.d_inner / tp, m.conv_channels / tp, m.heads / tp
    micro_batches = t / s.seq
    widened = 0 if b == _FP32 else 1  # upcast() copies only narrower activations
    return {"norm": norm_saved_bytes(model, s), "input": t * model.hidden * b,
            # kept through z (a view of it) only when upcast(z) is not a copy
            "in_proj": (1 - widened) * t * m.in_proj_out / tp * b,
            "conv": channels * (3 * t + (m.conv - 1) * micro_batches) * b,
            "dt": (2 + (m.dt_min > 0)) * t * heads * _FP32 + 2 * heads * _FP32,
            "skip": widened * t * inner * _FP32,
            "gated_norm": t * inner * _FP32 * (3 + widened) + t * m.groups / tp * _LSE_BYTES
            + 2 * t * inner * b}


def mamba_selective_bytes(model: ModelSpec, s: ActivationShape) -> dict[str, float]:
    """Kept under selective recompute: the input and the outputs of in_proj, the conv and out_proj
    (the scan is one opaque kernel to it, recomputed whole)."""
    m, t, b, tp = model.block("mamba"), s.tokens, s.act_bytes, s.tp
    out = {"input": s.stream_tokens * model.hidden * b, "in_proj": t * m.in_proj_out / tp * b,
           "conv": t * m.conv_channels / tp * b, "out_proj": t * model.hidden * b}
    out.update(_tp_collectives(model, s))
    return out


SAVED_BYTES = {"attention": (attention_saved_bytes, attention_selective_bytes),
               "mlp": (mlp_saved_bytes, mlp_selective_bytes),
               "moe": (moe_saved_bytes, moe_selective_bytes),
               "mamba": (mamba_saved_bytes, mamba_selective_bytes)}


def layer_saved_bytes(model: ModelSpec, kind: str, s: ActivationShape) -> tuple[float, float]:
    """(no recompute, selective recompute) bytes one layer of ``kind`` keeps for backward per
    micro-batch on one rank; full recompute keeps only the layer's input (``stream_bytes``)."""
    none, selective = SAVED_BYTES[kind]
    return sum(none(model, s).values()), sum(selective(model, s).values())


def stream_bytes(model: ModelSpec, s: ActivationShape) -> float:
    """One residual-stream tensor on the rank: what full recompute keeps of a layer."""
    return s.stream_tokens * model.hidden * s.act_bytes


def head_saved_bytes(model: ModelSpec, s: ActivationShape) -> float:
    """The last stage: final norm, the head's input (all tokens), the fp32 log-softmax of the
    (vocab-parallel) logits and the int64 labels."""
    return (norm_saved_bytes(model, s) + s.tokens * model.hidden * s.act_bytes
            + s.tokens * model.vocab / s.tp * _FP32 + s.tokens * 8)
