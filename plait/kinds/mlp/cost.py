"""The dense MLP kind's planner terms (the protocol: plait/kinds/attention/cost.py)."""
from __future__ import annotations

from plait.ir import counts
from plait.kinds import absent
from plait.planner.cost import comm as collectives, compute, memory
from plait.planner.cost.compute import Work
from plait.planner.cost.context import Context


def work(ctx: Context) -> Work:
    mlp = ctx.model.mlp
    ffn = compute.ffn_work(ctx, ctx.tokens, mlp.ffn / ctx.layout.tp, mlp.gated)
    norm, residual = compute.norm_and_residual(ctx)
    return compute.plus(ffn, memory=compute.memory_time(ctx, norm + residual),
                        selective=compute.memory_time(ctx, norm))


def comm(ctx: Context, work: Work) -> tuple[dict, dict]:
    fwd = {"tp": collectives.tp_comm(ctx)}
    return fwd, dict(fwd)


def activations(ctx: Context) -> tuple[float, float]:
    return counts.layer_saved_bytes(ctx.model, "mlp", memory.shape(ctx))


def params_on_rank(ctx: Context) -> tuple[float, float]:
    return memory.dense_params_on_rank(ctx, "mlp")


buffers = absent.no_buffers
topology_checks = absent.no_topology_checks
cp_host = absent.no_cp_host
experts_host = absent.no_experts_host
uncertain_ranges = absent.no_uncertain_ranges
