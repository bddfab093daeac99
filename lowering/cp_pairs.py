"""Chunk-pair attention kernels for the ring (lowering/cp_attention.py): (out, log-sum-exp) of one
query chunk against one key chunk, and the pair's backward given the *merged* output and
log-sum-exp (the flash-attention backward needs nothing else, so the ring merges partial results
by LSE and runs each pair's backward independently, as PyTorch's own ring attention does).

  math        explicit scores (any device; arithmetic at least fp32, fp64 stays fp64)
  cpu-flash   aten::_scaled_dot_product_flash_attention_for_cpu and its backward (fp32 and up)
  sdpa-flash  aten::_scaled_dot_product_flash_attention and its backward: SDPA's flash backend
              on CUDA, on bf16 / fp16 operands with fp32 log-sum-exp (it has no fp32 kernel)

A lowered graph asks for "auto": cpu-flash on CPU, math elsewhere. runtime/kernels.py binds
"sdpa-flash" on CUDA when `plait doctor` reports it (torch's flash backend is built in and passes
a self-check on the device: `self_check`). A ring running sdpa-flash on fp32 activations (an fp32
job) or head dimensions flash does not take (not a multiple of 8, or above 256) uses math.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

NEG_INF = float("-inf")
LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class PairKernel:
    name: str
    forward: Callable  # (q, k, v, scale, causal) -> (out, lse fp32); q, k, v [b, h, l, d]
    backward: Callable  # (do, q, k, v, out, lse, scale, causal) -> (dq, dk, dv)
    low_precision: bool = False  # computes on bf16 / fp16 operands

    def operand_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the ring hands this kernel q, k, v (and dout, out) in."""
        return dtype if self.low_precision else torch.promote_types(dtype, torch.float32)


# ---- math -------------------------------------------------------------------------------------
def _scores(q, k, scale: float, causal: bool) -> torch.Tensor:
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(mask, NEG_INF)
    return s


def math_forward(q, k, v, scale: float, causal: bool):
    s = _scores(q, k, scale, causal)
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse[..., None]), v), lse


def math_backward(do, q, k, v, out, lse, scale: float, causal: bool):
    """Flash-attention backward of one chunk pair given the merged output and log-sum-exp."""
    p = torch.exp(_scores(q, k, scale, causal) - lse[..., None])
    delta = (do * out).sum(-1)
    dv = torch.matmul(p.transpose(-1, -2), do)
    ds = p * (torch.matmul(do, v.transpose(-1, -2)) - delta[..., None])
    return torch.matmul(ds, k) * scale, torch.matmul(ds.transpose(-1, -2), q) * scale, dv


# ---- PyTorch's flash kernels --------------------------------------------------------------------
def cpu_flash_forward(q, k, v, scale: float, causal: bool):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def cpu_flash_backward(do, q, k, v, out, lse, scale: float, causal: bool):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, out, lse, 0.0, causal, scale=scale)


def sdpa_flash_forward(q, k, v, scale: float, causal: bool):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False,
                                                                   scale=scale)[:2]
    return out, lse


def sdpa_flash_backward(do, q, k, v, out, lse, scale: float, causal: bool):
    # Dense (not varlen) inputs: no cumulative sequence lengths (None, as the forward returns);
    # the lengths come from the tensors; the dropout RNG state is not read without dropout.
    seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
    offset = torch.zeros((), dtype=torch.uint64, device=q.device)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        do.contiguous(), q, k, v, out, lse.contiguous(), None, None, q.shape[2], k.shape[2], 0.0,
        causal, seed, offset, scale=scale)


KERNELS = {
    "math": PairKernel("math", math_forward, math_backward),
    "cpu-flash": PairKernel("cpu-flash", cpu_flash_forward, cpu_flash_backward),
    "sdpa-flash": PairKernel("sdpa-flash", sdpa_flash_forward, sdpa_flash_backward, low_precision=True),
}


def resolve(name: str, q: torch.Tensor) -> PairKernel:
    """The kernel a ring named ``name`` runs for activations like ``q``."""
    if name == "auto":
        return KERNELS["cpu-flash" if q.device.type == "cpu" else "math"]
    kernel = KERNELS[name]
    if kernel.low_precision and not flash_shapes(q):
        return KERNELS["math"]
    return kernel


def flash_shapes(q: torch.Tensor) -> bool:
    """Can SDPA's flash kernel take activations like ``q`` ([b, s, h, d]): bf16 / fp16, a head
    dimension that is a multiple of 8 and at most 256?"""
    d = q.shape[-1]
    return q.dtype in LOW_PRECISION and d % 8 == 0 and d <= 256


def self_check(name: str, device, dtype=torch.bfloat16) -> None:
    """Run kernel ``name`` on one small causal and one full pair on ``device`` and compare with the
    math kernel on the same (rounded) operands; raises when it fails or differs by more than a few
    roundings of ``dtype`` (bf16: 2^-8 each)."""
    kernel, gen = KERNELS[name], torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, 64, 32, generator=gen).to(device, dtype) for _ in range(4))
    for causal in (True, False):
        out, lse = kernel.forward(q, k, v, 0.2, causal)
        want, want_lse = math_forward(q.float(), k.float(), v.float(), 0.2, causal)
        grads = kernel.backward(do, q, k, v, out, lse, 0.2, causal)
        wanted = math_backward(do.float(), q.float(), k.float(), v.float(), out.float(), lse, 0.2, causal)
        for what, got, ref in [("out", out, want), ("lse", lse, want_lse)] + list(zip(("dq", "dk", "dv"), grads, wanted)):
            err = ((got.float() - ref).norm() / ref.norm()).item()
            if not err <= 0.02:
                raise RuntimeError(f"{name} pair kernel self-check: {what} off by {err:.3g} (causal={causal})")
