"""The precision policy: the one place that says which dtype each tensor has and which arithmetic
each GEMM runs in. Lowering (the reference model's dtype, the fp8 linear pass), the runtime (the
optimizer's fp32 main weights, FSDP2's mixed-precision policy, the kernel binding) and the cost
model (GEMM peak per layer, bytes per parameter) all ask it; none of them names a dtype itself.

  fp32   everything fp32: today's numerics, bit for bit.
  bf16   Megatron-Core's mixed precision: bf16 parameters and activations; fp32 main weights, Adam
         moments, and gradients (accumulated and reduced in fp32). Norm statistics, softmax, router
         logits and top-k, the SSM state and scan, and logits + cross entropy compute in fp32 (the
         reference modules upcast there, as Megatron-Core and the HF models do).
  fp8    Nemotron-H's recipe on top of bf16: the linear layers' GEMMs with per-tensor current
         (dynamic) scaling, E4M3 for inputs and weights and E5M2 for output gradients (Megatron's
         "hybrid" format, torchao's default), except the first and last ``bf16_ends`` layers, whose
         GEMMs stay bf16. Expert grouped GEMMs, attention cores, the LM head stay bf16.

Dtypes are names ("float32", "bfloat16") so the IR needs no torch; lowering maps them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import PlaitError
from .job import Precision, TrainJob

FP32, BF16 = "float32", "bfloat16"
# Nemotron-H keeps the GEMMs of the first and last 4 layers in bf16.
DEFAULT_BF16_ENDS = 4
# The fp8 recipe the runtime executes (torchao Float8Linear tensorwise, or its CPU emulation).
RUNTIME_FP8_RECIPE = "tensorwise"
# What runs in fp32 under bf16 / fp8 (for people: plan --explain, doctor, the docs).
FP32_ISLANDS = ("norm statistics", "softmax", "router logits + top-k", "SSM state and scan",
                "logits + cross entropy")


@dataclass(frozen=True)
class PrecisionPolicy:
    kind: str  # "fp32" | "bf16" | "fp8"
    num_layers: int
    bf16_first: int = 0  # fp8: leading layers whose GEMMs stay bf16
    bf16_last: int = 0  # fp8: trailing layers whose GEMMs stay bf16
    recipe: Optional[str] = None  # fp8 scaling recipe as written in the job (None: tensorwise)

    @classmethod
    def of(cls, job: TrainJob) -> "PrecisionPolicy":
        """The job's policy; a job built in code with ``precision=None`` (numerics checks) is fp32."""
        if job.precision is None:
            return cls("fp32", job.model.num_layers)
        return cls.from_precision(job.precision, job.model.num_layers)

    @classmethod
    def from_precision(cls, p: Precision, num_layers: int) -> "PrecisionPolicy":
        if p.kind != "fp8":
            return cls(p.kind, num_layers)
        return cls("fp8", num_layers, p.fp8_skip_first, p.fp8_skip_last, p.fp8_recipe)

    # -- dtypes ------------------------------------------------------------------------------------
    @property
    def mixed(self) -> bool:
        """bf16 / fp8: low-precision parameters with fp32 main weights in the optimizer."""
        return self.kind != "fp32"

    @property
    def param_dtype(self) -> str:
        """The model's parameters and activations (what the forward computes with)."""
        return BF16 if self.mixed else FP32

    @property
    def main_dtype(self) -> str:
        """Main (master) weights, gradients and Adam moments."""
        return FP32

    @property
    def reduce_dtype(self) -> str:
        """Gradients are accumulated over micro-batches and reduced over DP in this dtype."""
        return FP32

    # -- fp8 GEMMs ---------------------------------------------------------------------------------
    def gemm_precision(self, layer: int) -> str:
        """"fp8", "bf16" or "fp32": how layer ``layer``'s linear GEMMs run."""
        if self.kind != "fp8":
            return self.kind
        in_ends = layer < self.bf16_first or layer >= self.num_layers - self.bf16_last
        return "bf16" if in_ends else "fp8"

    @property
    def fp8_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.gemm_precision(i) == "fp8")

    def describe(self, first: int = 0, last: Optional[int] = None) -> str:
        """Precision of layers [first, last) for people: "bf16", "fp8", "fp8 (bf16 GEMMs: 0-3)"."""
        last = self.num_layers if last is None else last
        if self.kind != "fp8":
            return self.kind
        bf16 = [i for i in range(first, last) if self.gemm_precision(i) == "bf16"]
        if not bf16:
            return "fp8"
        if len(bf16) == last - first:
            return "bf16 (fp8 recipe's bf16 ends)"
        return f"fp8 (bf16 GEMMs: layers {_ranges(bf16)})"

    def check_runnable(self) -> None:
        """The runtime executes tensorwise current scaling only; other recipes are for export."""
        if self.kind == "fp8" and self.recipe not in (None, RUNTIME_FP8_RECIPE):
            raise PlaitError(f"plait's runtime trains fp8 with {RUNTIME_FP8_RECIPE} current scaling "
                             f"(torchao Float8Linear); recipe {self.recipe!r} is only exported",
                             hint=f"precision = fp8(recipe = {RUNTIME_FP8_RECIPE}) to train it here, "
                                  "or `plait export megatron` for Transformer Engine's recipes")


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out, start = [], layers[0]
    for i, cur in enumerate(layers):
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if nxt != cur + 1:
            out.append(str(start) if start == cur else f"{start}-{cur}")
            start = nxt
    return ", ".join(out)


def fp8_ends_problem(num_layers: int, first: int, last: int) -> Optional[str]:
    """Why an fp8 recipe keeping ``first`` + ``last`` layers in bf16 has no fp8 layer left."""
    if first + last >= num_layers:
        return (f"fp8 keeps the first {first} and last {last} layers' GEMMs in bf16, which leaves "
                f"none of the model's {num_layers} layers in fp8")
    return None
