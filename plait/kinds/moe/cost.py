"""The mixture-of-experts kind's planner terms (the protocol: plait/kinds/attention/cost.py).
The MoE side runs on the expert groups (ETP x EP x EDP, MoE Parallel Folding); its volumes are
sized by the busiest expert rank (expert_load)."""
from __future__ import annotations

import math
from dataclasses import replace
from statistics import NormalDist

from plait.ir import counts
from plait.kinds import absent
from plait.planner.cost import comm as collectives, compute, memory
from plait.planner.cost.compute import Work
from plait.planner.cost.context import Context


def routed_tokens(ctx: Context) -> float:
    """Token copies one rank pushes through its experts per micro-batch and MoE layer:
    the etp ranks of an expert shard all see the tokens the shard receives."""
    moe = ctx.model.moe
    t_in = ctx.tokens / ctx.layout.tp  # MoE input is sequence-parallel over tp
    return ctx.layout.etp * t_in * moe.top_k * expert_load(ctx)


def expert_load(ctx: Context) -> float:
    """Tokens the busiest expert rank receives over the balanced share (T * top_k / experts
    per expert). The MoE costs (dispatch volume, expert GEMMs, permutation, buffers) are
    sized by that rank, since the all-to-all and the step wait for it. Assumptions:

      dropless            routing_imbalance: the measured moe_imbalance when calibrated,
                          else the expected busiest rank of balanced random routing
      capacity factor cf  min(cf, routing_imbalance): no expert keeps more than cf x its
                          share, tokens over it are dropped (drop policy does not change
                          volumes)
      cf + pad            cf: every expert is padded to its capacity
    """
    cf = ctx.job.moe.capacity_factor
    if cf is None:
        return routing_imbalance(ctx)
    return cf if ctx.job.moe.pad_to_capacity else min(cf, routing_imbalance(ctx))


def routing_imbalance(ctx: Context) -> float:
    """Busiest expert rank over the mean, one micro-batch through one MoE layer: the
    calibration's measured moe_imbalance, else expected_max_load of the EP group's tokens
    (each EP rank routes its own tokens / tp) under a balanced router."""
    if ctx.cal.moe_imbalance > 0:
        return ctx.cal.moe_imbalance
    moe, lay = ctx.model.moe, ctx.layout
    tokens = lay.ep * ctx.tokens / lay.tp
    return expected_max_load(tokens, moe.top_k, moe.experts, lay.ep)


def expected_max_load(tokens: float, top_k: int, experts: int, ranks: int) -> float:
    """Expected busiest of ``ranks`` expert ranks (experts / ranks experts each) over the mean
    when ``tokens`` tokens each pick ``top_k`` distinct experts uniformly at random: the least
    imbalance any router shows (a trained one with its balancing loss is at best this even).

    Per token, the copies landing on one rank's L = experts / ranks experts are hypergeometric:
    mean k L / E, variance k (L/E) (1 - L/E) (E - k) / (E - 1); over T tokens the rank's load is
    close to normal. The ranks' loads add up to T k, so they are correlated -1 / (n - 1): their
    largest is sqrt(n / (n - 1)) x the expected largest of n independent standard normals (Blom's
    score Phi^-1((n - 0.375) / (n + 0.25))) standard deviations above the mean."""
    if ranks <= 1 or tokens <= 0 or experts <= top_k:
        return 1.0
    share = 1.0 / ranks
    mean = tokens * top_k * share
    var = tokens * top_k * share * (1 - share) * (experts - top_k) / (experts - 1)
    z = NormalDist().inv_cdf((ranks - 0.375) / (ranks + 0.25)) * math.sqrt(ranks / (ranks - 1))
    return 1.0 + z * math.sqrt(var) / mean


def work(ctx: Context) -> Work:
    model, lay = ctx.model, ctx.layout
    moe, h = model.moe, model.hidden
    t_in = ctx.tokens / lay.tp
    local = moe.experts // lay.ep
    routed = routed_tokens(ctx)
    # expert grouped GEMMs and the fp32 router never run in fp8 (ir/precision.py)
    experts = compute.ffn_work(ctx, routed / local, moe.ffn / lay.etp, moe.gated, local,
                               ctx.peak_high, routed=True)
    router = compute.gemm_times(ctx, t_in, moe.experts, h, peak=ctx.peak_high)
    shared = (compute.ffn_work(ctx, ctx.tokens, moe.shared_ffn / lay.tp, moe.gated)
              if moe.shared_ffn else Work())
    norm, residual = compute.norm_and_residual(ctx)
    # permute + unpermute + probability-weighted combine: read and write every routed copy; with
    # more than one local expert and EP > 1 the received chunks are sorted by expert after the
    # all-to-all and unsorted before it (Megatron-Core's sort_chunks_by_idxs): twice the traffic
    sorts = 2 if lay.ep > 1 and local > 1 and lay.dispatcher == "alltoall" else 1
    permute = 4 * sorts * routed / lay.etp * h * ctx.act_bytes
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
    dispatcher. Exposed. The all-to-all is sized by the busiest expert rank, ``expert_load(ctx)``
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
    sent = t_in * moe.top_k * expert_load(ctx) * h * b
    a2a = 2 * collectives.all_to_all(ctx, ctx.group("expert", "ep"), sent)
    etp_full = sent * lay.etp
    return a2a + 2 * collectives.all_gather(ctx, ctx.group("expert", "etp"), etp_full)


def activations(ctx: Context) -> tuple[float, float]:
    """The routed token copies (the busiest expert rank's) join the shape the other kinds see."""
    shape = replace(memory.shape(ctx), routed_tokens=routed_tokens(ctx))
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
    return 2 * routed_tokens(ctx) / ctx.layout.etp * ctx.model.hidden * ctx.act_bytes


def topology_checks(layout) -> tuple:
    return (("expert", "ep", "expert all-to-all", layout.ep),)


# the busiest expert rank over its share under a trained router: no measured trained-router
# imbalance is among plait's references; the upper end is what practice budgets for it, the
# capacity factor Switch Transformer trains at (1.25; Fedus et al. 2022, JMLR, Table 1)
TRAINED_ROUTER = 1.25


cp_host = absent.no_cp_host


def experts_host(ctx: Context) -> float:
    """Host seconds of the layer's local experts (experts / ep of them, each its own linears on
    the loop path) and its shared expert per micro-batch, forward + backward, beyond host_us_moe:
    measured by `plait calibrate` (runtime/calibrate_host.py); 0 unmeasured."""
    m, cal = ctx.model.moe, ctx.cal
    shared = cal.host_us_moe_shared if m.shared_ffn else 0.0
    return (cal.host_us_moe_expert * m.experts / ctx.layout.ep + shared) * 1e-6


def uncertain_ranges(ctx: Context) -> dict:
    """moe_imbalance unmeasured: from the balanced random routing the cost model assumes to a
    trained router's budgeted imbalance (0 stands for the balanced value: routing_imbalance)."""
    balanced = routing_imbalance(ctx)
    return {"moe_imbalance": (0.0, max(TRAINED_ROUTER, balanced), (
        f"balanced random routing ({balanced:.2f}) to a trained router "
        f"(budgeted as Switch Transformer's capacity factor {TRAINED_ROUTER})"))}
