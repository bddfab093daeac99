"""Chunk-pair attention kernels for the ring (lowering/cp_attention.py): (out, log-sum-exp) of one
query chunk against one key chunk, and the pair's backward given the *merged* output and
log-sum-exp (the flash-attention backward needs nothing else, so the ring merges partial results
by LSE and runs each pair's backward independently, as PyTorch's own ring attention does).

  math        explicit scores (any device; arithmetic at least fp32, fp64 stays fp64)
  cpu-flash   aten::_scaled_dot_product_flash_attention_for_cpu and its backward (fp32 and up; a
              sliding window's band pair passes its mask)
  sdpa-flash  aten::_scaled_dot_product_flash_attention and its backward: SDPA's flash backend
              on CUDA, on bf16 / fp16 operands with fp32 log-sum-exp (it has no fp32 kernel); a
              band pair (sliding window) has no flash mask and runs the math in fp32

A lowered graph asks for "auto": cpu-flash on CPU, math elsewhere. runtime/kernels.py binds
"sdpa-flash" on CUDA when `plait doctor` reports it (torch's flash backend is built in and passes
a self-check on the device: `self_check`). A ring running sdpa-flash on fp32 activations (an fp32
job) or head dimensions flash does not take (not a multiple of 8, or above 256) uses math.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .modules.attention import band_mask

NEG_INF = float("-inf")
LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class PairKernel:
    name: str
    # (q, k, v, scale, offset, window) -> (out, lse fp32); q, k, v [b, h, l, d], the query chunk
    # ``offset`` positions after the key chunk (0: the same chunk), within ``window``
    forward: Callable
    backward: Callable  # (do, q, k, v, out, lse, scale, offset, window) -> (dq, dk, dv)
    low_precision: bool = False  # computes on bf16 / fp16 operands

    def operand_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the ring hands this kernel q, k, v (and dout, out) in."""
        return dtype if self.low_precision else upcast_dtype(dtype)


def upcast_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least fp32 (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def pair_visibility(chunk: int, offset: int, window: Optional[int]) -> str:
    """"causal" (the same chunk, no window inside it), "all" (an earlier chunk wholly inside the
    window) or "band" (anything else: a mask the flash kernels cannot express)."""
    inside = window is None or offset + chunk - 1 < window
    if offset == 0 and (window is None or chunk <= window):
        return "causal"
    return "all" if offset >= chunk and inside else "band"


# ---- math -------------------------------------------------------------------------------------
def _scores(q, k, scale: float, offset: int, window: Optional[int], allowed=None) -> torch.Tensor:
    """Scaled scores, -inf where the causal band or the document mask ``allowed`` [b, l, l]
    (packed documents: cp_documents.py) hides a key."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    visible = band_mask(s.shape[-2], s.shape[-1], offset, window, s.device)
    if allowed is not None:
        visible = visible & allowed[:, None]
    return s.masked_fill(~visible, NEG_INF)


def finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with the -inf of rows that see no key (a band pair's corner) as 0: exp(-inf - 0) = 0."""
    return lse.masked_fill(lse == NEG_INF, 0.0)


def math_forward(q, k, v, scale: float, offset: int, window: Optional[int] = None, allowed=None):
    s = _scores(q, k, scale, offset, window, allowed)
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - finite(lse)[..., None]), v), lse


def math_backward(do, q, k, v, out, lse, scale: float, offset: int, window: Optional[int] = None,
                  allowed=None):
    """Flash-attention backward of one chunk pair given the merged output and log-sum-exp."""
    p = torch.exp(_scores(q, k, scale, offset, window, allowed) - lse[..., None])
    delta = (do * out).sum(-1)
    dv = torch.matmul(p.transpose(-1, -2), do)
    ds = p * (torch.matmul(do, v.transpose(-1, -2)) - delta[..., None])
    return torch.matmul(ds, k) * scale, torch.matmul(ds.transpose(-1, -2), q) * scale, dv


# ---- PyTorch's flash kernels --------------------------------------------------------------------
def _cpu_flash_args(q, offset: int, window: Optional[int]):
    """(is_causal, additive mask or None) for PyTorch's CPU flash kernels on this pair."""
    kind = pair_visibility(q.shape[2], offset, window)
    if kind != "band":
        return kind == "causal", None
    visible = band_mask(q.shape[2], q.shape[2], offset, window, q.device)
    return False, torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill(~visible, NEG_INF)


def cpu_flash_forward(q, k, v, scale: float, offset: int, window: Optional[int] = None):
    causal, mask = _cpu_flash_args(q, offset, window)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    if mask is not None:  # the kernel gives a row that sees no key lse 0; it weighs nothing: -inf
        lse = lse.masked_fill(mask.isinf().all(-1), NEG_INF)
    return out, lse


def cpu_flash_backward(do, q, k, v, out, lse, scale: float, offset: int, window: Optional[int] = None):
    causal, mask = _cpu_flash_args(q, offset, window)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale)


def upcast_all(*tensors):
    return [t.to(upcast_dtype(t.dtype)) for t in tensors]


def sdpa_flash_forward(q, k, v, scale: float, offset: int, window: Optional[int] = None):
    kind = pair_visibility(q.shape[2], offset, window)
    if kind == "band":  # a sliding window's band: no flash mask for it, the math in fp32
        return math_forward(*upcast_all(q, k, v), scale, offset, window)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, kind == "causal", False, scale=scale)[:2]
    return out, lse


def sdpa_flash_backward(do, q, k, v, out, lse, scale: float, offset: int, window: Optional[int] = None):
    kind = pair_visibility(q.shape[2], offset, window)
    if kind == "band":
        return math_backward(*upcast_all(do, q, k, v, out), lse, scale, offset, window)
    # Dense (not varlen) inputs: no cumulative sequence lengths (None, as the forward returns);
    # the lengths come from the tensors; the dropout RNG state is not read without dropout.
    seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
    offset_t = torch.zeros((), dtype=torch.uint64, device=q.device)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        do.contiguous(), q, k, v, out, lse.contiguous(), None, None, q.shape[2], k.shape[2], 0.0,
        kind == "causal", seed, offset_t, scale=scale)


KERNELS = {
    "math": PairKernel("math", math_forward, math_backward),
    "cpu-flash": PairKernel("cpu-flash", cpu_flash_forward, cpu_flash_backward),
    "sdpa-flash": PairKernel("sdpa-flash", sdpa_flash_forward, sdpa_flash_backward, low_precision=True),
}


def resolve(name: str, q: torch.Tensor, v: Optional[torch.Tensor] = None) -> PairKernel:
    """The kernel a ring named ``name`` runs for activations like ``q`` (and ``v``). PyTorch's
    flash kernels take one head width for q, k and v; multi-head latent attention's narrower v
    heads run the math."""
    if v is not None and v.shape[-1] != q.shape[-1]:
        return KERNELS["math"]
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
    for offset in (0, 64):  # the diagonal pair (causal) and an earlier chunk (all of it)
        out, lse = kernel.forward(q, k, v, 0.2, offset)
        want, want_lse = math_forward(q.float(), k.float(), v.float(), 0.2, offset)
        grads = kernel.backward(do, q, k, v, out, lse, 0.2, offset)
        wanted = math_backward(do.float(), q.float(), k.float(), v.float(), out.float(), lse, 0.2, offset)
        for what, got, ref in [("out", out, want), ("lse", lse, want_lse)] + list(zip(("dq", "dk", "dv"), grads, wanted)):
            err = ((got.float() - ref).norm() / ref.norm()).item()
            if not err <= 0.02:
                raise RuntimeError(f"{name} pair kernel self-check: {what} off by {err:.3g} (offset {offset})")
