"""The mixture-of-experts kind's planner terms (the protocol: plait/kinds/attention/cost.py).
The MoE side runs on the expert groups (ETP x EP x EDP, MoE Parallel Folding); its volumes are
sized by the busiest expert rank (Context.expert_load)."""
from __future__ import annotations

from dataclasses import replace

from plait.ir import counts
from plait.planner.cost import comm as collectives, compute, memory
from plait.planner.cost.compute import Work
from plait.planner.cost.context import Context


def work(ctx: Context) -> Work:
    model, lay = ctx.model, ctx.layout
    moe, h = model.moe, model.hidden
    t_in = ctx.tokens / lay.tp
    local = moe.experts // lay.ep
    # expert grouped GEMMs and the fp32 router never run in fp8 (ir/precision.py)
    experts = compute.ffn_work(ctx, ctx.routed_tokens / local, moe.ffn / lay.etp, moe.gated, local,
                               ctx.peak_high)
    router = compute.gemm_times(ctx, t_in, moe.experts, h, peak=ctx.peak_high)
    shared = (compute.ffn_work(ctx, ctx.tokens, moe.shared_ffn / lay.tp, moe.gated)
              if moe.shared_ffn else Work())
    norm, residual = compute.norm_and_residual(ctx)
    # permute + unpermute + probability-weighted combine: read and write every routed copy; with
    # more than one local expert and EP > 1 the received chunks are sorted by expert after the
    # all-to-all and unsorted before it (Megatron-Core's sort_chunks_by_idxs): twice the traffic
    sorts = 2 if lay.ep > 1 and local > 1 and lay.dispatcher == "alltoall" else 1
    permute = 4 * sorts * ctx.routed_tokens / lay.etp * h * ctx.act_bytes
    routing = t_in * moe.experts * 4 * 3  # fp32 logits, softmax, top-k
    flops = experts.flops + shared.flops + t_in * 2 * h * moe.experts
    return Work(gemm=experts.gemm + router[0] + shared.gemm,
                gemm_bwd=experts.backward_gemm + router[1] + shared.backward_gemm,
                memory=experts.memory + shared.memory + compute.memory_time(
                    ctx, norm + residual + permute + routing),
                selective=experts.selective + shared.selective + compute.memory_time(ctx, norm),
                flops=flops)


def comm(ctx: Context, work: Work) -> tuple[dict, dict]:
    """The shared expert's tensor parallelism (a TP shard like a dense MLP's), then the dispatch."""
    fwd = {}
    if ctx.model.moe.shared_ffn:
        fwd["tp"] = collectives.tp_comm(ctx)
    fwd["ep"] = dispatch_comm(ctx)
    return fwd, dict(fwd)


def dispatch_comm(ctx: Context) -> float:
    """Token dispatch + combine of one MoE layer (forward): all-to-all over EP then all-gather /
    reduce-scatter over ETP, or one all-gather / reduce-scatter over ETPxEP for the allgather
    dispatcher. Exposed. The all-to-all is sized by the busiest expert rank, ``ctx.expert_load``
    x the balanced volume (dropless: the calibration's moe_imbalance, 1.10 by default; capacity
    factor cf: min(cf, moe_imbalance); padded to capacity: cf); the allgather dispatcher moves
    every token whatever the routing. Its time comes from ``all_to_all`` on the EP group's real
    placement: the share for peers on this node over NVLink, the rest over the NIC."""
    lay, moe = ctx.layout, ctx.model.moe
    h, b = ctx.model.hidden, ctx.act_bytes
    t_in = ctx.tokens / lay.tp
    if lay.dispatcher == "allgather":
        g = ctx.group("expert", "etp-ep")
        full = t_in * g.size * h * b
        return collectives.all_gather(ctx, g, full) + collectives.reduce_scatter(ctx, g, full)
    sent = t_in * moe.top_k * ctx.expert_load * h * b
    a2a = 2 * collectives.all_to_all(ctx, ctx.group("expert", "ep"), sent)
    etp_full = sent * lay.etp
    return a2a + 2 * collectives.all_gather(ctx, ctx.group("expert", "etp"), etp_full)


def activations(ctx: Context) -> tuple[float, float]:
    """The routed token copies (the busiest expert rank's) join the shape the other kinds see."""
    shape = replace(memory.shape(ctx), routed_tokens=ctx.routed_tokens)
    return counts.layer_saved_bytes(ctx.model, "moe", shape)


def params_on_rank(ctx: Context) -> tuple[float, float]:
    """Norm, router and shared expert are dense (TP-sharded, over DP x CP); the experts shard
    over EP x ETP and, under FSDP, over EDP."""
    model, lay = ctx.model, ctx.layout
    norm = counts.norm_params(model)
    dense_shapes, expert_shapes = counts.layer_shapes(model, "moe", lay.tp, lay.ep, lay.etp)
    dense_pad = memory.fsdp_pad(ctx, dense_shapes, lay.dp * lay.cp)
    dense = norm + counts.router_params(model) + counts.shared_expert_params(model) / lay.tp
    expert = counts.expert_params(model) / (lay.ep * lay.etp)
    return dense + dense_pad, expert + memory.fsdp_pad(ctx, expert_shapes, lay.edp)


def buffers(ctx: Context) -> float:
    """The dispatch's send and receive buffers of the routed token copies."""
    return 2 * ctx.routed_tokens / ctx.layout.etp * ctx.model.hidden * ctx.act_bytes


def topology_checks(layout) -> tuple:
    return (("expert", "ep", "expert all-to-all", layout.ep),)
