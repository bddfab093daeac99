"""Evaluate one partition of the units into pipeline stages: per-rank time and memory, step time,
throughput, MFU, exposed communication and the bubble -> a Prediction."""
from __future__ import annotations

from dataclasses import dataclass

from plait.ir import counts
from plait.ir.plan import MemoryBreakdown, Prediction, Stage

from . import comm, compute, memory
from .pipeline import OPTIONS, CostTable


@dataclass(frozen=True)
class RankCost:
    time: float  # forward + backward of one micro-batch over all the rank's chunks
    fwd: float
    dense_params: float
    expert_params: float
    activations: float  # bytes at the schedule's peak (in-flight micro-batches)
    transient: float
    comm: dict
    fp32_params: float = 0.0  # of dense_params, kept fp32 in a bf16 / fp8 model


def rank_cost(table: CostTable, stages: tuple[Stage, ...], rank: int) -> RankCost:
    time = fwd = dense = expert = act = transient = fp32_kept = 0.0
    comm_acc: dict = {}
    last_chunk = table.chunks - 1
    for st in stages:
        if st.pp_rank != rank:
            continue
        opt = OPTIONS.index(st.recompute)
        chunk_act = 0.0
        for u in table.units_of(st):
            time += u.time(opt)
            fwd += u.fwd
            dense, expert = dense + u.dense_params, expert + u.expert_params
            fp32_kept += u.fp32_params
            chunk_act += u.act[opt]
            transient = max(transient, u.transient[opt])
            for k, v in u.comm + (u.recompute_comm if opt == 2 else ()):
                comm_acc[k] = comm_acc.get(k, 0.0) + v
        act += chunk_act
        chunk = st.virtual * table.layout.pp + st.pp_rank
        time += table.chunk_time
        comm_acc["pp"] = comm_acc.get("pp", 0.0) + table.p2p
        if table.fsdp_edge > 0:
            comm_acc["dp"] = comm_acc.get("dp", 0.0) + table.fsdp_edge
        for extra, present in ((table.first, chunk == 0), (table.last, chunk == last_chunk)):
            if present:
                time += extra.time
                dense += extra.params
                for k, v in extra.comm:
                    comm_acc[k] = comm_acc.get(k, 0.0) + v
    return RankCost(time=time, fwd=fwd, dense_params=dense, expert_params=expert,
                    activations=act * table.inflight(rank), transient=transient, comm=comm_acc,
                    fp32_params=fp32_kept)


def rank_memory(table: CostTable, rc: RankCost, rank: int) -> MemoryBreakdown:
    s = memory.state_bytes(table.ctx, rc.dense_params, rc.expert_params, rc.fp32_params)
    buffers = table.buffer_bytes(rank) + rc.transient
    frag = table.fragmentation * (rc.activations + buffers)
    return MemoryBreakdown(weights=s["weights"], gradients=s["grads"], optimizer=s["optimizer"],
                           activations=rc.activations, buffers=buffers,
                           reserve=table.reserve_fixed + frag)


def overlap_passes(pp: int, vpp: int, microbatches: int) -> float:
    """How many micro-batch passes (all of a rank's chunks) the data-parallel traffic can hide
    behind (Megatron's overlap_grad_reduce / overlap_param_gather). 1F1B: a model chunk's
    gradients are complete only in the last backward, so its reduction overlaps that one pass
    (and the parameter all-gather the next step's first forward). Interleaved: the cool-down runs
    the chunks' last backwards one chunk after the other, pp micro-batches each, so chunk c's
    reduction hides behind the c chunks still to finish: (vpp - 1) pp + 1 chunk passes in all,
    each 1/vpp of a micro-batch pass; the warm-up gives the all-gathers the same in forward."""
    if vpp <= 1:
        return 1.0
    return min(float(microbatches), ((vpp - 1) * pp + 1) / vpp)


def sync_time(table: CostTable, rc: RankCost) -> tuple[float, float]:
    """(exposed data-parallel seconds, optimizer seconds) per step for one rank: the gradient
    reduction and parameter all-gather less what compute beside them hides. The window is
    overlap_passes micro-batch passes (backward for the reduction, forward for the gather); of
    the time a collective and its window run together, the device's measured overlap of that
    collective is hidden (comm.hidden: overlap_reduce_scatter, overlap_all_gather), as for FSDP's
    traffic: the same NCCL kernels beside the same GEMMs. A replicated all-reduce is priced as its
    reduce-scatter half's kind. A stack that syncs after the backward (dp_sync_overlap 0, plait's
    runtime) hides nothing."""
    ctx, lay = table.ctx, table.layout
    red, gather = comm.dp_sync(ctx, rc.dense_params, rc.expert_params)
    passes = overlap_passes(lay.pp, lay.vpp, table.microbatches) * ctx.cal.dp_sync_overlap
    exposed = (red - comm.hidden(ctx, "reduce_scatter", red, passes * (rc.time - rc.fwd))
               + gather - comm.hidden(ctx, "all_gather", gather, passes * rc.fwd))
    sharded = lay.dp_kind != "replicated"
    opt = (compute.optimizer_time(ctx, rc.dense_params, lay.dp * lay.cp if sharded else 1)
           + compute.optimizer_time(ctx, rc.expert_params, lay.edp if sharded else 1))
    return exposed, opt


def evaluate(table: CostTable, stages: tuple[Stage, ...]) -> Prediction:
    job, lay = table.job, table.layout
    ranks = [rank_cost(table, stages, r) for r in range(lay.pp)]
    t_max = max(rc.time for rc in ranks)
    syncs = [sync_time(table, rc) for rc in ranks]
    dp_exposed = max(s[0] for s in syncs)
    world_sync = comm.step_reductions(table.ctx)
    step = table.schedule_factor * t_max + max(s[0] + s[1] for s in syncs) + world_sync
    tokens = job.global_batch * job.seq_len
    world = job.cluster.world
    model_flops = tokens * counts.flops_per_token(job.model, job.seq_len)
    hw_flops = model_flops + tokens * recompute_flops_per_token(table, stages)
    peak = job.cluster.device.peak_flops("bf16")
    busiest = max(ranks, key=lambda rc: rc.time)
    exposed = {k: v * table.microbatches for k, v in busiest.comm.items() if v > 0}
    if dp_exposed > 0:
        exposed["dp"] = exposed.get("dp", 0.0) + dp_exposed
    if world_sync > 0:
        exposed["world"] = world_sync
    return Prediction(
        step_time=step, tokens_per_s=tokens / step, mfu=model_flops / (step * world * peak),
        tflops_per_gpu=model_flops / (step * world) / 1e12,
        bubble=(lay.pp - 1) / lay.vpp * t_max / step,
        memory=tuple(rank_memory(table, rc, r) for r, rc in enumerate(ranks)),
        exposed_comm=tuple(sorted(exposed.items())),
        hardware_tflops_per_gpu=hw_flops / (step * world) / 1e12)


def recompute_flops_per_token(table: CostTable, stages: tuple[Stage, ...]) -> float:
    """Forward FLOPs per token repeated by fully recomputed units (Megatron's convention: the
    hardware FLOPs of SC'21 Table 1)."""
    model, seq = table.job.model, table.job.seq_len
    per_kind = {k: counts.layer_flops(model, k, seq) for k in set(model.layers)}
    out = 0.0
    for st in stages:
        if st.recompute == "full":
            out += sum(per_kind[k] for u in table.units_of(st) for k in u.kinds)
    return out


def rank_tensor_bytes(table: CostTable, stages: tuple[Stage, ...], rank: int) -> dict[str, float]:
    """What the memory model says pipeline rank ``rank`` holds, per tensor class
    (counts.STATE_CLASSES) and ``saved``: the bytes its layers, and the head on the last stage,
    keep for backward per micro-batch (one micro-batch in flight), and ``gathered``: FSDP's gathered
    weights and unsharded gradients at their peak. The terms runtime/harness/memory_probe.py
    measures on the real runtime."""
    rc = rank_cost(table, stages, rank)
    out = memory.state_tensors(table.ctx, rc.dense_params, rc.expert_params, rc.fp32_params)
    saved = rc.activations / table.inflight(rank)
    if any(st.pp_rank == rank and st.virtual * table.layout.pp + rank == table.chunks - 1
           for st in stages):
        saved += memory.head_activations(table.ctx)
    out["saved"] = saved
    out["gathered"] = table.fsdp_buffer  # FSDP's gathered units and unsharded gradients
    return out
