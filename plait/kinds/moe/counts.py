"""The MoE block's counts facet: a router, routed experts (grouped GEMMs), an optional shared
expert with an optional sigmoid gate. The protocol is at the top of
plait/kinds/attention/counts.py. Imports only ir.

Router GEMMs (``2*hidden*experts``, plus ``2*hidden`` for a shared-expert gate) are counted, a
documented departure from Megatron's formula (0.3% of Qwen3-30B-A3B's FLOPs, less for coarser
MoEs)."""
from __future__ import annotations

from typing import Optional

from plait.ir.counts import ffn_gemms, ffn_params
from plait.ir.counts.activations import ActivationShape, ffn_saved_bytes, norm_saved_bytes
from plait.ir.counts.fsdp import Shapes, ffn_shapes
from plait.ir.counts.state import FP32_BYTES
from plait.ir.model import ModelSpec
from plait.kinds import absent

EXPERTS = True
EXPORTS = ("one_expert_params", "expert_params", "router_params", "shared_expert_params",
           "moe_params", "router_flops", "moe_flops", "moe_saved_bytes", "moe_selective_bytes")


# --- parameters --------------------------------------------------------------------------------

def one_expert_params(model: ModelSpec) -> int:
    """One routed expert of the MoE block."""
    moe = model.block("moe")
    return ffn_params(model.hidden, moe.ffn, moe.gated)


def expert_params(model: ModelSpec) -> int:
    """Routed-expert parameters of ONE moe layer (all experts)."""
    return model.block("moe").experts * one_expert_params(model)


def router_params(model: ModelSpec) -> int:
    """Router Linear(hidden, experts) plus the shared expert's sigmoid gate Linear(hidden, 1)."""
    moe = model.block("moe")
    return model.hidden * moe.experts + (model.hidden if moe.shared_gate else 0)


def shared_expert_params(model: ModelSpec) -> int:
    moe = model.block("moe")
    return ffn_params(model.hidden, moe.shared_ffn, moe.gated) if moe.shared_ffn else 0


def moe_params(model: ModelSpec) -> int:
    """One MoE block without its pre-norm: router, routed experts, shared expert (+ gate)."""
    return router_params(model) + expert_params(model) + shared_expert_params(model)


params = moe_params


def inactive_params(model: ModelSpec) -> int:
    """The routed experts a token is not sent to: experts - top_k of them."""
    moe = model.block("moe")
    return (moe.experts - moe.top_k) * one_expert_params(model)


def fp32_kept_params(model: ModelSpec, tp: int = 1) -> float:
    """The router, kept in fp32 (as Megatron does) and replicated over TP."""
    return model.hidden * model.block("moe").experts


# --- FLOPs -------------------------------------------------------------------------------------

def router_flops(model: ModelSpec) -> float:
    """Router GEMM (+ shared-expert gate); Megatron's formula leaves these out (0.3% of Qwen3-30B-A3B's
    training FLOPs, less for coarser MoEs)."""
    return float(2 * router_params(model))


def moe_flops(model: ModelSpec) -> float:
    """top_k routed experts + the shared expert + the router, per token."""
    moe = model.block("moe")
    expert_width = moe.top_k * moe.ffn + moe.shared_ffn
    return 2 * model.hidden * expert_width * ffn_gemms(moe.gated) + router_flops(model)


def flops(model: ModelSpec, seq_len: int, causal: bool = True, index: Optional[int] = None) -> float:
    return moe_flops(model)


recompute_flops = absent.no_recompute_flops


# --- saved activations -------------------------------------------------------------------------

def moe_saved_bytes(model: ModelSpec, s: ActivationShape) -> dict[str, float]:
    """Router logits and probabilities (fp32); the router's input (this rank's tokens: the MoE
    input is sequence-parallel over tp); the dispatched token copies (= the experts' fc1 input)
    and the experts' FFN tensors (etp-sharded width over the copies their shard receives, load
    included); the combine on the token owner: its own token copies back from the experts, kept
    twice (the weighting product keeps the rows for the weights' gradient, index_add keeps the
    weighted rows, its source); the shared expert, its gathered input when it is a TP shard, and
    its output kept for the sigmoid gate's product. Measured tensor by tensor on tiny-moe (dp2,
    dp2 ep2, tp2 sp ep2: tests/runtime/test_memory_truth.py)."""
    moe, h, b = model.block("moe"), model.hidden, s.act_bytes
    own = s.tokens / s.tp  # this rank's tokens
    copies = s.routed_tokens
    out = {"norm": norm_saved_bytes(model, s), "input": own * h * b,
           "router": own * moe.experts * FP32_BYTES * 2, "dispatched": copies * h * b,
           "experts": ffn_saved_bytes(copies, moe.ffn / s.etp, moe.gated, b),
           "combine": 2 * own * moe.top_k * h * b}
    if moe.shared_ffn:
        out["shared"] = ffn_saved_bytes(s.tokens, moe.shared_ffn / s.tp, moe.gated, b)
        if s.tp > 1:  # the TP shard runs on the group's gathered tokens
            out["shared_input"] = s.tokens * h * b
        if moe.shared_gate:
            out["shared_out"] = own * h * b
    return out


def moe_selective_bytes(model: ModelSpec, s: ActivationShape) -> dict[str, float]:
    """Kept under selective recompute: everything but the norm and the activation functions'
    outputs (the grouped GEMMs' and the dispatch's outputs stay)."""
    moe, b = model.block("moe"), s.act_bytes
    out = dict(moe_saved_bytes(model, s))
    out.pop("norm")
    out["input"] = s.stream_tokens * model.hidden * b
    out["experts"] = ffn_saved_bytes(s.routed_tokens, moe.ffn / s.etp, moe.gated, b) / 2
    if moe.shared_ffn:
        out["shared"] = ffn_saved_bytes(s.tokens, moe.shared_ffn / s.tp, moe.gated, b) / 2
    return out


saved_bytes, selective_bytes = moe_saved_bytes, moe_selective_bytes


# --- FSDP shapes -------------------------------------------------------------------------------

def shapes(model: ModelSpec, tp: int = 1, ep: int = 1, etp: int = 1) -> tuple[Shapes, Shapes]:
    """Dense: the router [experts, hidden] and the shared expert's gate [1, hidden] (replicated
    over TP), the shared expert (a dense MLP sharded over TP). Expert: the grouped routed experts
    [experts / ep, (2)ffn / etp, hidden] and [experts / ep, hidden, ffn / etp]."""
    moe, h = model.moe, model.hidden
    dense = ((moe.experts, h),) + (((1, h),) if moe.shared_gate else ())
    dense += ffn_shapes(h, moe.shared_ffn, moe.gated, False, tp) if moe.shared_ffn else ()
    local, ffn = moe.experts // ep, moe.ffn // etp
    return dense, ((local, (2 if moe.gated else 1) * ffn, h), (local, h, ffn))
