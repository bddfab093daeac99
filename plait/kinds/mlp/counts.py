"""The dense MLP's counts facet: a (gated) feed-forward network hidden -> ffn -> hidden. The
protocol is at the top of plait/kinds/attention/counts.py. Imports only ir."""
from __future__ import annotations

from typing import Optional

from plait.ir.counts import ffn_gemms, ffn_params
from plait.ir.counts.activations import (ActivationShape, ffn_saved_bytes, norm_saved_bytes,
                                         tp_collective_bytes)
from plait.ir.counts.fsdp import Shapes, ffn_shapes
from plait.ir.model import MLP, ModelSpec
from plait.kinds import absent

EXPERTS = False
EXPORTS = ("mlp_params", "mlp_flops", "mlp_saved_bytes", "mlp_selective_bytes")


def mlp_params(model: ModelSpec, mlp: MLP) -> int:
    return ffn_params(model.hidden, mlp.ffn, mlp.gated, mlp.bias)


def params(model: ModelSpec) -> int:
    return mlp_params(model, model.block("mlp"))


inactive_params = absent.no_params
fp32_kept_params = absent.no_fp32_params


def mlp_flops(model: ModelSpec) -> float:
    mlp = model.block("mlp")
    return float(2 * model.hidden * mlp.ffn * ffn_gemms(mlp.gated))


def flops(model: ModelSpec, seq_len: int, causal: bool = True, index: Optional[int] = None) -> float:
    return mlp_flops(model)


recompute_flops = absent.no_recompute_flops


def mlp_saved_bytes(model: ModelSpec, s: ActivationShape) -> dict[str, float]:
    mlp = model.block("mlp")
    return {"norm": norm_saved_bytes(model, s), "input": s.tokens * model.hidden * s.act_bytes,
            "ffn": ffn_saved_bytes(s.tokens, mlp.ffn / s.tp, mlp.gated, s.act_bytes)}


def mlp_selective_bytes(model: ModelSpec, s: ActivationShape) -> dict[str, float]:
    """Kept under selective recompute: the input, the up (and gate) and down matmul outputs and
    the TP collectives."""
    mlp, t, b = model.block("mlp"), s.tokens, s.act_bytes
    out = {"input": s.stream_tokens * model.hidden * b,
           "up": t * mlp.ffn / s.tp * b * (2 if mlp.gated else 1), "down": t * model.hidden * b}
    out.update(tp_collective_bytes(model, s))
    return out


saved_bytes, selective_bytes = mlp_saved_bytes, mlp_selective_bytes


def shapes(model: ModelSpec, tp: int = 1, ep: int = 1, etp: int = 1) -> tuple[Shapes, Shapes]:
    mlp = model.mlp
    return ffn_shapes(model.hidden, mlp.ffn, mlp.gated, mlp.bias, tp), ()
