"""The attention core's efficiency against the kernel's sequence length, measured by `plait
calibrate` (runtime/calibrate_cost.py) and fitted to the cost model's curve
(planner/cost/compute.py attention_eff):

    eff(s) = attn_eff / (1 + attn_knee / s)      forward; backward at attn_bwd_ratio x eff(s)

Causal attention as the runtime runs it (runtime/kernels.py's choice: flash-attn on CUDA where it
imports, else the lowered op, SDPA: flash / cuDNN attention on CUDA, PyTorch's on the CPU) is timed
at a few sequence lengths with the tokens per call held constant (batch x length), as the
FlashAttention papers' micro-benchmarks do, so that the GPU stays equally full and only the kernel's
per-tile costs (prologue, epilogue, the causal diagonal) change with the length. FLOPs are counted
causally, as ir/counts does (half the square): forward 4 * s^2/2 * head_dim per head, backward
2.5x. The fit is fit_reciprocal's least squares of 1/eff against 1/s (intercept 1/attn_eff,
slope attn_knee/attn_eff), the way fit_knee fits the GEMMs; benchmarks/attention_kernels.py fits
the published H100 kernel benchmarks with the same function.
"""
from __future__ import annotations

import statistics

import torch

from plait.lowering.modules import attention as ref_attention

from . import kernels
from .calibrate_timing import timed

BWD_FLOPS = 2.5  # backward FLOPs over forward's (planner/cost/compute.py BWD_CORE)

# an accelerator: the FlashAttention-3 paper's benchmark shape (16K tokens per call, head
# dim 128, 2048 / 128 heads) at three lengths of its sweep, so the GPU is full at every length
CUDA_SHAPE = ((512, 2048, 8192), 16, 128, 16384)


def fit_reciprocal(xs: list[float], effs: list[float]) -> tuple[float, float] | None:
    """(eff, knee) of eff(x) = eff / (1 + knee x) by least squares of 1/eff(x) against x, whose
    intercept is 1/eff and slope knee/eff; None when the points show no knee (noise: the
    intercept not positive or the slope negative)."""
    ys = [1.0 / e for e in effs]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    intercept = my - slope * mx
    if intercept <= 0 or slope < 0:
        return None
    return 1.0 / intercept, slope / intercept


def fit_attention(points: list[tuple[float, float, float]], peak: float
                  ) -> tuple[float, float, float]:
    """(attn_eff, attn_knee, attn_bwd_ratio) from (sequence length, forward FLOP/s, backward
    FLOP/s): the forward's curve by fit_reciprocal in 1/s, the backward's ratio to it by least
    squares with the same knee. No knee in the points: the longest length's rates, knee 0."""
    fwd = [(s, f / peak) for s, f, _ in points]
    fitted = fit_reciprocal([1.0 / s for s, _ in fwd], [e for _, e in fwd])
    if fitted is None:
        s, f, b = max(points)
        return f / peak, 0.0, b / f
    eff, knee = fitted
    curve = [eff / (1.0 + knee / s) for s, _, _ in points]
    bwd = [b / peak for *_, b in points]
    ratio = sum(c * e for c, e in zip(curve, bwd)) / sum(c * c for c in curve)
    return eff, knee, ratio


def attention_rates(seq: int, batch: int, heads: int, head_dim: int, dtype, device
                    ) -> tuple[float, float]:
    """(forward FLOP/s, backward FLOP/s) of causal attention on [batch, seq, heads, head_dim] as
    the runtime runs it: the kernel runtime/kernels.py binds on the device (flash-attn on CUDA
    where it imports), else the lowered op (SDPA)."""
    attend, _ = kernels.bound(ref_attention.causal_attention, device)
    q, k, v = (torch.randn(batch, seq, heads, head_dim, dtype=dtype, device=device,
                           requires_grad=True) for _ in range(3))
    scale = head_dim ** -0.5
    flops = batch * heads * 2 * 2 * seq * seq / 2 * head_dim
    fwd = timed(lambda: attend(q, k, v, scale), device)

    def both():
        attend(q, k, v, scale).sum().backward()

    bwd = max(timed(both, device) - fwd, 1e-9)
    return flops / fwd, BWD_FLOPS * flops / bwd


def attention_points(lengths: tuple[int, ...], heads: int, head_dim: int, tokens: int, dtype,
                     device) -> list[tuple[int, float, float]]:
    """[(length, forward FLOP/s, backward FLOP/s)] at ``tokens`` per call (batch = tokens /
    length); on CUDA at CUDA_SHAPE."""
    if device.type == "cuda":
        lengths, heads, head_dim, tokens = CUDA_SHAPE
    return [(s, *attention_rates(s, max(1, tokens // s), heads, head_dim, dtype, device))
            for s in lengths]
