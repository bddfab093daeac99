"""FP8 linear GEMMs with per-tensor current (dynamic) scaling: the reference op compiled graphs call.

    fp8_linear(x, weight, bias)  ==  F.linear(x, weight, bias) with every GEMM operand in fp8

Forward: x and weight cast to E4M3, each with scale = max(E4M3) / amax(tensor) computed from the
tensor itself (no history); backward: the output gradient cast to E5M2 the same way, multiplied
with the E4M3 weight (input gradient) and the E4M3 input (weight gradient). That is torchao's
Float8Linear "tensorwise" recipe and Transformer Engine's Float8CurrentScaling with the HYBRID
format. Like torchao, the high-precision x and weight are saved for backward and cast again there.

This module is the CPU emulation: operands are quantised through torch.float8_e4m3fn /
float8_e5m2 with the scales above, the products summed in fp32 and scaled back, the result rounded
to the input dtype, i.e. what torch._scaled_mm computes. On CUDA the runtime binds torchao's (or
Transformer Engine's) fp8 cast and GEMM to the same graph nodes (runtime/kernels.py,
runtime/fp8_backends.py: the same autograd function and scales with another GEMM backend); tests
check the emulation and the torchao backend give torchao Float8Linear's numbers.

Under TP an operand may be a shard; its scale is then the whole logical tensor's (Scales).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.fx

from . import collectives  # noqa: F401  (registers torch.ops.plait.max_over)

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
AMAX_EPS = 1e-12  # torchao's floor on amax: an all-zero tensor gets a finite scale


Reducer = Optional[Callable[[torch.Tensor], torch.Tensor]]


def tensorwise_scale(t: torch.Tensor, dtype: torch.dtype, reduce: Reducer = None) -> torch.Tensor:
    """max(dtype) / amax(t) in fp32 (computed in fp64 first, as torchao does). ``reduce`` turns a
    shard's amax into the whole logical tensor's (an all-reduce MAX over the TP group)."""
    # exact: a max of the tensor's own values, in at least fp32 (what a TP group all-reduces)
    amax = t.detach().abs().max().to(torch.promote_types(t.dtype, torch.float32))
    if reduce is not None:
        amax = reduce(amax)
    return (torch.finfo(dtype).max / torch.clamp(amax.to(torch.float64), min=AMAX_EPS)).to(torch.float32)


def quantise(t: torch.Tensor, dtype: torch.dtype,
             reduce: Reducer = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(t in ``dtype``, its scale): saturating cast of t * scale."""
    return Emulated.cast(t, tensorwise_scale(t, dtype, reduce), dtype, "")


class Emulated:
    """The GEMM backend on CPU: operands through torch.float8_e4m3fn / e5m2, products summed in fp32
    and scaled back (what torch._scaled_mm computes). A backend has two functions:
      cast(t, scale, dtype, role) -> an fp8 operand (role: "input" | "weight" | "grad_output")
      mm(a, b, out_dtype)         -> a @ b of two fp8 operands, in out_dtype
    On CUDA runtime/fp8_backends.py puts torchao's (Float8TrainingTensor, torch._scaled_mm) or
    Transformer Engine's cast and GEMM in its place; the scales are decided here for all."""

    @staticmethod
    def cast(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, role: str):
        limit = torch.finfo(dtype).max
        return (t.detach().to(torch.float32) * scale).clamp(-limit, limit).to(dtype), scale

    @staticmethod
    def mm(a, b, out_dtype: torch.dtype) -> torch.Tensor:
        (qa, sa), (qb, sb) = a, b
        return ((qa.to(torch.float32) @ qb.to(torch.float32)) * (sa.reciprocal() * sb.reciprocal())).to(out_dtype)


def scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, a_dtype: torch.dtype, b: torch.Tensor,
              b_scale: torch.Tensor, b_dtype: torch.dtype, out_dtype: torch.dtype,
              roles: tuple[str, str] = ("input", "weight"), backend=Emulated) -> torch.Tensor:
    """a [m, k] @ b [k, n], each operand cast to fp8 with its per-tensor scale; fp32 accumulation."""
    qa = backend.cast(a, a_scale, a_dtype, roles[0])
    qb = backend.cast(b, b_scale, b_dtype, roles[1])
    return backend.mm(qa, qb, out_dtype)


@dataclass(frozen=True)
class Scales:
    """Where each operand's amax comes from: this rank's tensor (None) or the whole logical tensor
    over a TP group (all-reduce MAX). torchao's Float8 TP (DTensor) and Transformer Engine's
    amax reduction do the same, so a TP-sharded GEMM quantises on the single-device grid:
      column-parallel  weight rows and output-gradient columns are shards; the input is whole
      row-parallel     input columns and weight columns are shards; the output gradient is whole
    """
    x: Reducer = None
    weight: Reducer = None
    grad: Reducer = None

    @staticmethod
    def of(axis: Optional[str], size: int, role: Optional[str]) -> "Scales":
        if axis is None or size == 1 or role not in ("column", "row"):
            return Scales()
        over = functools.partial(torch.ops.plait.max_over, axis=axis, size=size)
        return Scales(x=over if role == "row" else None, weight=over,
                      grad=over if role == "column" else None)


class _Fp8Linear(torch.autograd.Function):
    """The three GEMMs of a linear layer in fp8 (E4M3 forward operands, E5M2 output gradient).
    Each operand's scale is computed once: the input's and the weight's in the forward, kept for
    the backward (the same tensors, so the same scales torchao recomputes there), the output
    gradient's once for both backward GEMMs; under TP that is one amax all-reduce per sharded
    operand (column-parallel: weight, output gradient; row-parallel: input, weight)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scales: Scales, backend) -> torch.Tensor:
        sx, sw = tensorwise_scale(x, E4M3, scales.x), tensorwise_scale(weight, E4M3, scales.weight)
        ctx.save_for_backward(x, weight, sx, sw)
        ctx.scales, ctx.backend = scales, backend
        flat = x.reshape(-1, x.shape[-1])
        out = scaled_mm(flat, sx, E4M3, weight.t(), sw, E4M3, x.dtype, ("input", "weight"), backend)
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, sx, sw = ctx.saved_tensors
        backend = ctx.backend
        go = grad.reshape(-1, grad.shape[-1])
        sg = tensorwise_scale(go, E5M2, ctx.scales.grad)
        grad_x = scaled_mm(go, sg, E5M2, weight, sw, E4M3, x.dtype, ("grad_output", "weight"),
                           backend).reshape(x.shape)
        grad_w = scaled_mm(go.t(), sg, E5M2, x.reshape(-1, x.shape[-1]), sx, E4M3, weight.dtype,
                           ("grad_output", "input"), backend)
        return grad_x, grad_w, None, None


def linear_with(backend):
    """fp8_linear computing its GEMMs with ``backend`` (see Emulated): what kernels.bind binds."""
    def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   tp_axis: str | None = None, tp_size: int = 1, tp_role: str | None = None) -> torch.Tensor:
        out = _Fp8Linear.apply(x, weight, Scales.of(tp_axis, tp_size, tp_role), backend)
        return out if bias is None else out + bias.to(out.dtype)
    return fp8_linear


_emulated_linear = linear_with(Emulated)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               tp_axis: str | None = None, tp_size: int = 1, tp_role: str | None = None) -> torch.Tensor:
    """F.linear with fp8 GEMMs (emulated); the bias is added in the output's precision. A
    TP-sharded linear names its axis, size and role ("column" / "row"): its scales are then the
    whole logical tensors' (see Scales)."""
    return _emulated_linear(x, weight, bias, tp_axis, tp_size, tp_role)


torch.fx.wrap("fp8_linear")
