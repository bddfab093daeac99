"""The fp8 GEMM backends a CUDA run can bind to an fp8 job's fp8 linears, and which one it binds.

Every backend runs under plait's fp8 autograd function (lowering/fp8.py), which decides the scales
(per-tensor current scaling; a TP shard takes the whole tensor's amax), so all of them compute the
same recipe; a backend supplies the cast to fp8 and the fp8 GEMM:

  torchao             torchao.float8: Float8TrainingTensor casts, torch._scaled_mm through its
                      torch.mm, configured as Float8Linear's defaults (bit-equal to Float8Linear)
  transformer-engine  Transformer Engine: Float8Quantizer with plait's scale (TE's per-tensor
                      Float8Tensor), general_gemm in its "TN" layout (both operands K-major)

Which one: the environment variable PLAIT_FP8_BACKEND ("auto", the default; "torchao";
"transformer-engine"; "emulation" for plait's own quantise-dequantise GEMM even on CUDA). "auto"
tries torchao first (the issue's choice: a pip-installable library that composes with FSDP2 and
TP), then transformer-engine, so a machine with TE and without torchao (an NGC container) trains
fp8 on TE. Each candidate is bound only after it imports, CUDA is there, and (on a real device)
one small fp8 linear, forward and backward, agrees with the emulation on the same device; a
failure falls through to the next with its reason, which `plait doctor --fp8` prints.
"""
from __future__ import annotations

import importlib
import inspect
import os
from typing import Callable

import torch

from plait.lowering import fp8

ENV = "PLAIT_FP8_BACKEND"
BACKENDS = ("torchao", "transformer-engine")
CHOICES = ("auto",) + BACKENDS + ("emulation",)
SELF_CHECK_TOL = 1e-2  # same scales and casts; only fp32 summation order differs (~1 bf16 step)


def requested() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    value = {"te": "transformer-engine"}.get(value, value)
    if value not in CHOICES:
        raise ValueError(f"{ENV}={value!r}; expected one of {', '.join(CHOICES)}")
    return value


def order() -> tuple[str, ...]:
    """The backends to try, in order, as PLAIT_FP8_BACKEND asks."""
    value = requested()
    return BACKENDS if value == "auto" else () if value == "emulation" else (value,)


# ---- torchao ----------------------------------------------------------------------------------
def torchao_linear(module) -> Callable:
    """``module``: torchao.float8."""
    config = module.Float8LinearConfig()

    def mm_config(gemm):
        return module.ScaledMMConfig(config.emulate, gemm.use_fast_accum, False, config.pad_inner_dim)

    linear_mm = module.LinearMMConfig(mm_config(config.gemm_config_output),
                                      mm_config(config.gemm_config_grad_input),
                                      mm_config(config.gemm_config_grad_weight))
    roles = {"input": module.GemmInputRole.INPUT, "weight": module.GemmInputRole.WEIGHT,
             "grad_output": module.GemmInputRole.GRAD_OUTPUT}
    to_float8 = module.float8_training_tensor.hp_tensor_and_scale_to_float8

    class Torchao:
        @staticmethod
        def cast(t, scale, dtype, role):
            return to_float8(t.detach(), scale, dtype, linear_mm, roles[role])

        @staticmethod
        def mm(a, b, out_dtype):
            return torch.mm(a, b).to(out_dtype)

    return fp8.linear_with(Torchao)


# ---- transformer-engine -------------------------------------------------------------------------
def te_linear(module) -> Callable:
    """``module``: transformer_engine.pytorch (importing it needs CUDA: TE raises otherwise)."""
    tex = importlib.import_module("transformer_engine_torch")
    quantizers = importlib.import_module("transformer_engine.pytorch.tensor.float8_tensor")
    gemm = importlib.import_module("transformer_engine.pytorch.cpp_extensions").general_gemm
    # TE < 2.x passes a cuBLAS workspace to general_gemm; later versions allocate their own
    workspace = (importlib.import_module("transformer_engine.pytorch.module.base").get_workspace
                 if "workspace" in inspect.signature(gemm).parameters else None)
    te_dtypes = {fp8.E4M3: tex.DType.kFloat8E4M3, fp8.E5M2: tex.DType.kFloat8E5M2}

    def quantise(t, scale, dtype):  # rows along K: TE's fp8 GEMM wants both operands K-major
        q = quantizers.Float8Quantizer(scale.reshape(1).to(t.device), torch.zeros(1, device=t.device),
                                       te_dtypes[dtype], rowwise=True, columnwise=False)
        return q.quantize(t.detach().contiguous())

    class TransformerEngine:
        @staticmethod
        def cast(t, scale, dtype, role):  # quantised in mm, once the orientation is known
            return t, scale, dtype

        @staticmethod
        def mm(a, b, out_dtype):
            (ta, sa, da), (tb, sb, db) = a, b
            # general_gemm(A, B, layout="TN") = B @ A^T: A = b^T [n, k], B = a [m, k]
            args = (quantise(tb.t(), sb, db), quantise(ta, sa, da))
            args += (workspace(),) if workspace is not None else ()
            return gemm(*args, out_dtype=out_dtype, layout="TN")[0]

    return fp8.linear_with(TransformerEngine)


BUILDERS = {"torchao": torchao_linear, "transformer-engine": te_linear}
PACKAGES = {"torchao": "torchao.float8", "transformer-engine": "transformer_engine.pytorch"}


def checked(build: Callable) -> Callable:
    """``build`` followed, on a real CUDA device, by the self-check."""
    def build_and_check(module):
        linear = build(module)
        if torch.cuda.is_available():
            self_check(linear, "cuda")
        return linear
    return build_and_check


def self_check(linear: Callable, device) -> None:
    """One bf16 fp8 linear (forward and both gradients) against the emulation on ``device``."""
    gen = torch.Generator().manual_seed(0)
    x, w, g = (torch.randn(*shape, generator=gen).to(device, torch.bfloat16)
               for shape in ((64, 128), (96, 128), (64, 96)))
    results = []
    for fn in (linear, fp8.fp8_linear):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(xx, ww)
        out.backward(g)
        results.append((out, xx.grad, ww.grad))
    for what, got, want in zip(("output", "input gradient", "weight gradient"), *results):
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        if not err <= SELF_CHECK_TOL:
            raise RuntimeError(f"self-check: {what} {err:.3g} away from plait's fp8 emulation")
