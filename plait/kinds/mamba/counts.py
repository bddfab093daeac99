"""The Mamba2 mixer's counts facet. The protocol is at the top of plait/kinds/attention/counts.py.
Imports only ir.

FLOPs follow Megatron's hybrid formula, with one documented departure: the inner width is the real
``heads * head_dim`` rather than Megatron's hard-coded ``2 * hidden`` (equal for Nemotron-H
8B/56B/47B; the pruned 4B has 7168 != 6144)."""
from __future__ import annotations

from typing import Optional

from plait.ir.counts import linear_params
from plait.ir.counts.activations import (LSE_BYTES, ActivationShape, norm_saved_bytes,
                                         tp_collective_bytes)
from plait.ir.counts.fsdp import Shapes, linear_shapes
from plait.ir.counts.state import FP32_BYTES
from plait.ir.model import Mamba2, ModelSpec
from plait.kinds import absent

EXPERTS = False
EXPORTS = ("mamba_params", "mamba_flops", "ssd_scan_flops", "mamba_saved_bytes",
           "mamba_cp_saved_bytes", "mamba_selective_bytes")


def mamba_params(model: ModelSpec, m: Mamba2) -> int:
    """Mamba2 mixer: in_proj -> [z, x, B, C, dt]; depthwise conv over x, B, C; per-head dt_bias,
    A_log and D; gated RMSNorm over d_inner; out_proj."""
    h = model.hidden
    in_proj = linear_params(h, m.in_proj_out, m.proj_bias)
    conv = m.conv_channels * m.conv + (m.conv_channels if m.conv_bias else 0)
    per_head = 3 * m.heads  # dt_bias, A_log, D
    gated_norm = m.d_inner  # always an RMSNorm scale
    out_proj = linear_params(m.d_inner, h, m.proj_bias)
    return in_proj + conv + per_head + gated_norm + out_proj


def params(model: ModelSpec) -> int:
    return mamba_params(model, model.block("mamba"))


inactive_params = absent.no_params


def fp32_kept_params(model: ModelSpec, tp: int = 1) -> float:
    """The per-head A_log, D and dt_bias, kept in fp32 (as Megatron does), split by TP with the
    heads."""
    return 3 * model.block("mamba").heads / tp


def mamba_flops(model: ModelSpec) -> float:
    """Megatron's hybrid formula: in_proj, a 7 * d_inner * state scan estimate, out_proj."""
    m = model.block("mamba")
    h = model.hidden
    return float(2 * h * m.in_proj_out + 7 * m.d_inner * m.state + 2 * m.d_inner * h)


def flops(model: ModelSpec, seq_len: int, causal: bool = True, index: Optional[int] = None) -> float:
    return mamba_flops(model)


def ssd_scan_flops(m: Mamba2, tokens: float, seq_len: float, tp: int = 1, cp: int = 1) -> float:
    """Forward FLOPs the SSD chunked scan executes on ``tokens`` tokens of one rank, its heads split
    over ``tp``, sequences of ``seq_len`` split over ``cp`` (lowering/modules/ssd.py ssd_chunked;
    per head of width p = head_dim, state n, chunk l, per token):

        scores C.B within the chunk        2 l n        their products with x      2 l p
        the state a chunk leaves (B x)     2 n p        the entering state read    2 n p

    and per sequence piece of c chunks the carry across them, 2 (c + 1)^2 n p. Under context
    parallelism (cp > 1) each chunk's final state and the entering state's correction add 4 n p
    per token (lowering/mamba_cp.py). What the cost model prices and `plait calibrate` divides
    its scan time by (tests/kinds/test_mamba_counts.py checks it against torch's FLOP counter);
    Megatron's MFU formula (mamba_flops) keeps its own 7 x d_inner x state estimate."""
    h, p, n, chunk = m.heads / tp, m.head_dim, m.state, m.chunk
    per_token = 2 * chunk * (n + p) + 4 * n * p + (4 * n * p if cp > 1 else 0)
    piece = seq_len / cp / (2 if cp > 1 else 1)  # one scan call: a zigzag half under CP
    chunks = -(-piece // chunk)
    return h * (tokens * per_token + tokens / piece * 2 * (chunks + 1) ** 2 * n * p)


recompute_flops = absent.no_recompute_flops


def mamba_saved_bytes(model: ModelSpec, s: ActivationShape) -> dict[str, float]:
    """Tensor by tensor (lowering/modules/mamba.py, no recompute): in_proj's input and output, the
    conv's padded input, pre-activation and output (x, B, C are views of it), dt before and after
    softplus (and the dt floor's output), fp32 upcasts where the activations are narrower, and the
    gated norm's tensors: its fp32 input, silu(z), the product, the group statistics and the
    normalised output before and after the scale (out_proj's input). The scan keeps only its inputs
    (it recomputes its chunk matrices in backward, as mamba-ssm's fused scan does). Under context
    parallelism, what the state-passing forms keep besides (mamba_cp_saved_bytes)."""
    m, t, b, tp = model.block("mamba"), s.tokens, s.act_bytes, s.tp
    inner, channels, heads = m.d_inner / tp, m.conv_channels / tp, m.heads / tp
    micro_batches = t / s.seq
    widened = 0 if b == FP32_BYTES else 1  # upcast() copies only narrower activations
    out = {"norm": norm_saved_bytes(model, s), "input": t * model.hidden * b,
           # kept through z (a view of it) only when upcast(z) is not a copy
           "in_proj": (1 - widened) * t * m.in_proj_out / tp * b,
           "conv": channels * (3 * t + (m.conv - 1) * micro_batches) * b,
           "dt": (2 + (m.dt_min > 0)) * t * heads * FP32_BYTES + 2 * heads * FP32_BYTES,
           "skip": widened * t * inner * FP32_BYTES,
           "gated_norm": t * inner * FP32_BYTES * (3 + widened) + t * m.groups / tp * LSE_BYTES
           + 2 * t * inner * b}
    if s.cp > 1:
        out.update(mamba_cp_saved_bytes(model, s))
    return out


INDEX_BYTES = 8  # an int64 index


def mamba_cp_saved_bytes(model: ModelSpec, s: ActivationShape) -> dict[str, float]:
    """What lowering/mamba_cp.py keeps beyond the reference mixer on its busiest rank. The conv:
    each chunk's padded input and pre-activation carry its predecessor's conv-1 halo as well
    (5 (conv-1) tokens more per sequence) and the gathered halos' order index. The scan, all
    fp32: per token each chunk's final-state product keeps exp(decay) and the decay weight (also
    permuted for the einsum), x weighted and B per head; its correction keeps exp(cumulative
    decay), C per head and the product; per sequence the 2 cp - 1 states and decays the
    recurrence multiplies (the zero state first); fp32 copies of x and dt where activations are
    narrower; the two gathers' order indices. The first rank's first chunk has no state entering
    (no C per head kept for it) and its last chunk's entering state is the one the recurrence
    does not keep: it holds state - chunk tokens x heads x state more, when that is positive."""
    m, t, b, tp = model.block("mamba"), s.tokens, s.act_bytes, s.tp
    heads, channels = m.heads / tp, m.conv_channels / tp
    sequences = t / s.seq
    widened = 0 if b == FP32_BYTES else 1
    state = sequences * heads * m.head_dim * m.state * FP32_BYTES
    first_rank = max(0.0, state - t / 2 * heads * m.state * FP32_BYTES)
    return {"cp_conv": channels * sequences * 5 * (m.conv - 1) * b + 2 * s.cp * INDEX_BYTES,
            "cp_scan": t * heads * FP32_BYTES * (3 + 2 * m.head_dim + 2 * m.state
                                                 + widened * (3 + m.head_dim))
            + (2 * s.cp - 1) * (state + sequences * heads * FP32_BYTES) + first_rank
            + 2 * 2 * s.cp * INDEX_BYTES}


def mamba_selective_bytes(model: ModelSpec, s: ActivationShape) -> dict[str, float]:
    """Kept under selective recompute: the input and the outputs of in_proj, the conv and out_proj
    (the scan is one opaque kernel to it, recomputed whole)."""
    m, t, b, tp = model.block("mamba"), s.tokens, s.act_bytes, s.tp
    out = {"input": s.stream_tokens * model.hidden * b, "in_proj": t * m.in_proj_out / tp * b,
           "conv": t * m.conv_channels / tp * b, "out_proj": t * model.hidden * b}
    out.update(tp_collective_bytes(model, s))
    return out


saved_bytes, selective_bytes = mamba_saved_bytes, mamba_selective_bytes


def shapes(model: ModelSpec, tp: int = 1, ep: int = 1, etp: int = 1) -> tuple[Shapes, Shapes]:
    """in_proj column-parallel, the depthwise conv (and bias), dt_bias / A_log / D and the gated
    norm's scale split with the heads, out_proj row-parallel (its bias whole)."""
    m, h = model.mamba, model.hidden
    channels = m.conv_channels // tp
    return (linear_shapes(h, m.in_proj_out, m.proj_bias, tp)
            + ((channels, 1, m.conv),) + (((channels,),) if m.conv_bias else ())
            + ((m.heads // tp,),) * 3  # dt_bias, A_log, D
            + ((m.d_inner // tp,),)  # the gated norm's scale
            + linear_shapes(m.d_inner, h, False, in_parts=tp) + (((h,),) if m.proj_bias else ())), ()
