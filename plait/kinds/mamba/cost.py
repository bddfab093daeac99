"""The Mamba2 kind's planner terms (the protocol: plait/kinds/attention/cost.py)."""
from __future__ import annotations

from plait.ir import counts
from plait.kinds import absent
from plait.planner.cost import comm as collectives, compute, memory
from plait.planner.cost.compute import Work
from plait.planner.cost.context import Context


def work(ctx: Context) -> Work:
    model, lay, t = ctx.model, ctx.layout, ctx.tokens
    m, h = model.mamba, model.hidden
    gemm, gemm_bwd = compute.sum_passes(compute.gemm_times(ctx, t, m.in_proj_out / lay.tp, h),
                                        compute.gemm_times(ctx, t, h, m.d_inner / lay.tp))
    scan_flops = counts.ssd_scan_flops(m, t, ctx.job.seq_len, lay.tp, lay.cp)
    conv = 2 * t * m.conv_channels / lay.tp * ctx.act_bytes
    gated_norm = 3 * t * m.d_inner / lay.tp * ctx.act_bytes
    norm, residual = compute.norm_and_residual(ctx)
    flops = t * (2 * h * m.in_proj_out + 2 * m.d_inner * h) / lay.tp + scan_flops
    return Work(gemm=gemm, gemm_bwd=gemm_bwd,
                core=compute.core_time(ctx, scan_flops, ctx.cal.scan_eff) + scan_elementwise(ctx),
                core_bwd_rate=ctx.cal.scan_bwd_ratio,
                memory=compute.memory_time(ctx, conv + gated_norm + norm + residual),
                selective=compute.memory_time(ctx, norm + gated_norm), flops=flops)


def scan_elementwise(ctx: Context) -> float:
    """Seconds of the eager scan's elementwise work beside its products, per micro-batch on one
    rank: scan_chunk_ns per token, head and chunk position plus scan_token_ns per token and head
    (`plait calibrate`, runtime/calibrate_scan.py); 0 for a fused scan."""
    m, cal = ctx.model.mamba, ctx.cal
    per = cal.scan_chunk_ns * m.chunk + cal.scan_token_ns
    return ctx.tokens * m.heads / ctx.layout.tp * per * 1e-9


def comm(ctx: Context, work: Work) -> tuple[dict, dict]:
    fwd = {"tp": collectives.tp_comm(ctx)}
    bwd = dict(fwd)
    if ctx.layout.cp > 1:
        fwd["cp"], bwd["cp"] = cp_comm(ctx), cp_comm(ctx, backward=True)
    return fwd, bwd


def cp_comm(ctx: Context, backward: bool = False) -> float:
    """Mamba2 under context parallelism (lowering/mamba_cp.py passes scan states): three
    all-gathers (plait::gather_seq), every zigzag chunk's conv halo, its fp32 final state and its
    fp32 decay, each its own call (tiny-hybrid-local cp2: 96 all-gathers a step for 4 Mamba
    layers x 8 micro-batches, benchmarks/count_collectives.py); backward, gather_seq's
    reduce-scatter of each (on gloo an all-reduce: comm.reduce_scatter). The volume does not
    grow with the sequence. The decays' gather follows the states' at once: its peers arrive
    together (comm.all_gather's synced)."""
    m, lay = ctx.model.mamba, ctx.layout
    if lay.cp <= 1:
        return 0.0
    chunks = 2 * lay.cp * lay.mbs
    states = chunks * m.heads / lay.tp * m.head_dim * m.state * 4
    decays = chunks * m.heads / lay.tp * 4
    halos = chunks * (m.conv - 1) * m.conv_channels / lay.tp * ctx.act_bytes
    g = ctx.group("dense", "cp")
    if backward:
        return sum(collectives.reduce_scatter(ctx, g, b) for b in (halos, states, decays))
    return (collectives.all_gather(ctx, g, halos) + collectives.all_gather(ctx, g, states)
            + collectives.all_gather(ctx, g, decays, synced=True))


def cp_host(ctx: Context) -> float:
    """Under CP the conv and the scan run once per zigzag chunk, with each chunk's final state,
    the entering states and the correction term besides (lowering/mamba_cp.py): host work
    measured by `plait calibrate` at cp = 2 (cp_host_us_mamba). A rank holds two chunks at any
    cp; only the entering-state recurrence (2 cp tiny steps) grows, and it is not scaled here."""
    return ctx.cal.cp_host_us_mamba * 1e-6 if ctx.layout.cp > 1 else 0.0


experts_host = absent.no_experts_host


def activations(ctx: Context) -> tuple[float, float]:
    return counts.layer_saved_bytes(ctx.model, "mamba", memory.shape(ctx))


def params_on_rank(ctx: Context) -> tuple[float, float]:
    return memory.dense_params_on_rank(ctx, "mamba")


buffers = absent.no_buffers
topology_checks = absent.no_topology_checks
uncertain_ranges = absent.no_uncertain_ranges
