"""FP8 linear GEMMs with per-tensor current (dynamic) scaling: the reference op compiled graphs call.

    fp8_linear(x, weight, bias)  ==  F.linear(x, weight, bias) with every GEMM operand in fp8

Forward: x and weight cast to E4M3, each with scale = max(E4M3) / amax(tensor) computed from the
tensor itself (no history); backward: the output gradient cast to E5M2 the same way, multiplied
with the E4M3 weight (input gradient) and the E4M3 input (weight gradient). That is torchao's
Float8Linear "tensorwise" recipe and Transformer Engine's Float8CurrentScaling with the HYBRID
format. Like torchao, the high-precision x and weight are saved for backward and cast again there.

This module is the CPU emulation: operands are quantised through torch.float8_e4m3fn /
float8_e5m2 with the scales above, the products summed in fp32 and scaled back, the result rounded
to the input dtype, i.e. what torch._scaled_mm computes. On CUDA the runtime binds torchao's fp8
GEMM to the same graph nodes (runtime/kernels.py); tests check both give the same numbers.
"""
from __future__ import annotations

import torch
import torch.fx

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
AMAX_EPS = 1e-12  # torchao's floor on amax: an all-zero tensor gets a finite scale


def tensorwise_scale(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """max(dtype) / amax(t) in fp32 (computed in fp64 first, as torchao does)."""
    amax = t.detach().abs().max().to(torch.float64)
    return (torch.finfo(dtype).max / torch.clamp(amax, min=AMAX_EPS)).to(torch.float32)


def quantise(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(t in ``dtype``, its scale): saturating cast of t * scale."""
    scale = tensorwise_scale(t, dtype)
    limit = torch.finfo(dtype).max
    return (t.detach().to(torch.float32) * scale).clamp(-limit, limit).to(dtype), scale


def scaled_mm(a: torch.Tensor, a_dtype: torch.dtype, b: torch.Tensor, b_dtype: torch.dtype,
              out_dtype: torch.dtype) -> torch.Tensor:
    """a [m, k] @ b [k, n] with both operands quantised per tensor; fp32 accumulation."""
    qa, sa = quantise(a, a_dtype)
    qb, sb = quantise(b, b_dtype)
    out = (qa.to(torch.float32) @ qb.to(torch.float32)) * (sa.reciprocal() * sb.reciprocal())
    return out.to(out_dtype)


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        flat = x.reshape(-1, x.shape[-1])
        out = scaled_mm(flat, E4M3, weight.t(), E4M3, x.dtype)
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        go = grad.reshape(-1, grad.shape[-1])
        grad_x = scaled_mm(go, E5M2, weight, E4M3, x.dtype).reshape(x.shape)
        grad_w = scaled_mm(go.t(), E5M2, x.reshape(-1, x.shape[-1]), E4M3, weight.dtype)
        return grad_x, grad_w


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with fp8 GEMMs (emulated); the bias is added in the output's precision."""
    out = _Fp8Linear.apply(x, weight)
    return out if bias is None else out + bias.to(out.dtype)


torch.fx.wrap("fp8_linear")
