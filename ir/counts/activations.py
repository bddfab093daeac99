"""Activation bytes: what one rank's layer keeps for backward per micro-batch, tensor by tensor as
the reference modules (lowering/modules) save them; the memory model (planner/cost/memory.py) and
the memory-truth tests (tests/runtime/test_memory_truth.py) read them from here. Each block kind's
tensors are in its counts facet (``saved_bytes``, ``selective_bytes``); the pieces they share
(the pre-norm, the TP collectives, a feed-forward network) are here."""
from __future__ import annotations

from dataclasses import dataclass

from plait.ir import kinds
from plait.ir.model import ModelSpec

from .state import FP32_BYTES

LSE_BYTES = FP32_BYTES  # attention log-sum-exp and norm statistics are fp32


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
    cp: int = 1  # context parallel size: sequence-mixing ops keep their CP forms' tensors too

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
        return stream * s.act_bytes + 2 * s.stream_tokens * LSE_BYTES
    return stream * (FP32_BYTES + s.act_bytes) + s.stream_tokens * LSE_BYTES


def tp_collective_bytes(model: ModelSpec, s: ActivationShape) -> dict[str, float]:
    """The TP collectives' outputs a layer keeps: the all-gathered input and reduce-scattered
    output under sequence parallelism, else the all-reduced output."""
    if s.tp == 1:
        return {}
    full = s.tokens * model.hidden * s.act_bytes
    if s.sp:  # all-gather of the norm output in, reduce-scatter out
        return {"gathered": full, "scattered": full / s.tp}
    return {"all_reduced": full}


def ffn_saved_bytes(tokens: float, width: float, gated: bool, b: int) -> float:
    """Gated (SwiGLU): gate and up outputs, silu(gate) and the product (down's input). Plain
    (GELU, ReLU²): the up output (or relu's) and the activation output (down's input)."""
    return tokens * width * b * (4 if gated else 2)


def layer_saved_bytes(model: ModelSpec, kind: str, s: ActivationShape) -> tuple[float, float]:
    """(no recompute, selective recompute) bytes one layer of ``kind`` keeps for backward per
    micro-batch on one rank; full recompute keeps only the layer's input (``stream_bytes``)."""
    facet = kinds.facet(kind, "counts")
    return sum(facet.saved_bytes(model, s).values()), sum(facet.selective_bytes(model, s).values())


def stream_bytes(model: ModelSpec, s: ActivationShape) -> float:
    """One residual-stream tensor on the rank: what full recompute keeps of a layer."""
    return s.stream_tokens * model.hidden * s.act_bytes


def head_saved_bytes(model: ModelSpec, s: ActivationShape) -> float:
    """The last stage: final norm, the head's input (all tokens), the fp32 log-softmax of the
    (vocab-parallel) logits and the int64 labels."""
    return (norm_saved_bytes(model, s) + s.tokens * model.hidden * s.act_bytes
            + s.tokens * model.vocab / s.tp * FP32_BYTES + s.tokens * 8)
