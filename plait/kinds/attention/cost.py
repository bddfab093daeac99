"""The attention kind's planner terms: what one attention layer costs on one rank per
micro-batch (compute, exposed communication, stored activations, parameters).

The cost facet protocol. Every kind's ``cost`` module (plait/kinds/<kind>/cost.py) exposes these
functions, and the cost model's core (planner/cost/) sums over a unit's layers by asking
``kinds.facet(kind, "cost")`` for them; it never branches on a kind's name. ``ctx`` is the
planner's Context of one (job, layout): calibration, tokens per rank, group shapes.

    work(ctx) -> compute.Work
        forward seconds of one layer on one rank, split by how each part runs (GEMMs, the
        attention core / SSM scan, memory-bound kernels), what selective recompute repeats,
        and the forward FLOPs this rank executes
    comm(ctx, work) -> (forward, backward)
        exposed seconds per group name ("tp", "cp", "ep", ...) of one layer, each a dict in the
        order the terms add up; ``work`` is this layer's work (what a kernel hides of a transfer)
    activations(ctx) -> (none, selective)
        bytes one layer keeps for backward per micro-batch with no recompute and with selective
        recompute (ir/counts/activations.py's tensors, plus what only the cost model knows)
    params_on_rank(ctx) -> (dense, expert)
        parameters of one layer on one rank, FSDP's padding included (dense ones shard over
        DP x CP, expert ones over EDP)
    buffers(ctx) -> float
        communication buffers a model with layers of this kind holds on a rank per micro-batch,
        beyond the sequence-parallel gather every kind shares (MoE's dispatch send / receive)
    topology_checks(layout) -> tuple[(side, group, what, size), ...]
        the kind's own collectives that `plait plan --explain` checks for crossing nodes, beyond
        the tensor- and context-parallel groups every kind shares
    cp_host(ctx) -> float
        host seconds context parallelism adds to one layer per micro-batch, forward + backward
        (the replacement ops' extra calls: pair kernels, merges, chunk-wise scans), beyond the
        exchanges ``comm`` prices; measured by `plait calibrate` (runtime/calibrate_cp.py)
    experts_host(ctx) -> float
        host seconds a layer's experts add per micro-batch, forward + backward, beyond the
        measured block (MoE: its local experts' and shared expert's, runtime/calibrate_host.py)
    uncertain_ranges(ctx) -> {calibration key: (low, high, why)}
        the plausible range of a calibration key of the kind's own when nobody measured it,
        where the range depends on the job and layout (planner/cost/uncertainty.py's band)

Counts (FLOPs, saved bytes, parameter shapes) come from ir/counts, the single source; this module
only decides how fast they run and what they occupy.
"""
from __future__ import annotations

from plait.ir import counts
from plait.kinds import absent
from plait.planner.cost import comm as collectives, compute, memory
from plait.planner.cost.compute import BWD_CORE, BWD_GEMM, Work
from plait.planner.cost.context import Context

# the protocol's functions, in the order above (tests/planner/test_cost_kinds.py holds every
# kind's cost facet to them)
PROTOCOL = ("work", "comm", "activations", "params_on_rank", "buffers", "topology_checks",
            "cp_host", "experts_host", "uncertain_ranges")


def work(ctx: Context) -> Work:
    model, lay, t = ctx.model, ctx.layout, ctx.tokens
    a, h = model.attention, model.hidden
    gemms = counts.attention_gemms(a, h, lay.tp)  # GQA's q/k/v and o, or MLA's projections
    gemm, gemm_bwd = compute.sum_passes(*(compute.gemm_times(ctx, t, n_out, n_in)
                                          for n_out, n_in in gemms))
    core_flops = t * counts.attention_core_flops(model, ctx.job.seq_len) / lay.tp
    norm, residual = compute.norm_and_residual(ctx)
    norm += latent_norm_bytes(ctx)
    rope = 2 * t * counts.rotated_width(a, lay.tp) * ctx.act_bytes if a.rope else 0.0
    flops = t * sum(2 * n_out * n_in for n_out, n_in in gemms) + core_flops
    memory_time = compute.memory_time
    if ctx.cal.flash_attention < 0.5:
        scores, score_mem = materialised_attention(ctx)
        return Work(gemm=gemm + scores, memory=memory_time(ctx, norm + residual + rope + score_mem),
                    selective=scores + memory_time(ctx, norm + score_mem), flops=flops,
                    gemm_bwd=gemm_bwd + BWD_GEMM * scores)
    core = compute.core_time(ctx, core_flops, core_eff(ctx))
    merge = ring_merge_bytes(ctx)
    # selective recompute re-runs the norm and the attention core (see activations)
    return Work(gemm=gemm, core=core, memory=memory_time(ctx, norm + residual + rope + merge),
                selective=core + memory_time(ctx, norm), flops=flops,
                core_bwd_rate=ctx.cal.attn_bwd_ratio, gemm_bwd=gemm_bwd)


def kernel_keys(ctx: Context, window: int | None) -> float:
    """The sequence length one attention kernel call sees (the side of its causal square: how
    many keys a query tile iterates over), which sets its efficiency (compute.attention_eff).
    Without context parallelism, seq_len. Under ring CP (zigzag, Transformer Engine's P2P CP and
    plait's lowering/cp_attention.py) a rank holds seq_len / cp tokens and every ring step is one
    call: the diagonal step a causal seq_len / cp square; the others unmasked, seq_len / cp
    queries x seq_len / 2cp keys or the reverse: no half-masked diagonal tiles and the same mean
    key span as the causal square, so seq_len / cp prices them a little pessimistically.
    Ulysses (all-to-all) CP computes whole sequences of fewer heads: seq_len. A sliding window
    w shorter than that cuts every query's key span to w."""
    lay = ctx.layout
    keys = ctx.job.seq_len / (lay.cp if lay.cp_comm == "ring" else 1)
    return keys if window is None else min(float(window), keys)


def core_eff(ctx: Context) -> float:
    """The attention core's efficiency over the model's attention layers: each layer's
    compute.attention_eff at its kernel_keys, weighted by its core FLOPs (attended keys) so that
    the layers' summed seconds are right."""
    cal, model = ctx.cal, ctx.model
    if cal.attn_knee <= 0:
        return cal.attn_eff
    windows = counts.attention_windows(model) or (model.block("attention").window,)
    flops = seconds = 0.0
    for window in set(windows):
        share = windows.count(window) * counts.attended_keys(ctx.job.seq_len, window)
        flops += share
        seconds += share / compute.attention_eff(cal, kernel_keys(ctx, window))
    return flops / seconds


def latent_norm_bytes(ctx: Context) -> float:
    """Multi-head latent attention's q and kv latent RMSNorms (replicated over TP): read + write."""
    a = ctx.model.attention
    if a.latent is None:
        return 0.0
    return 2 * ctx.tokens * sum(counts.latent_widths(a)) * ctx.act_bytes


MERGE_BYTES = 4 + 2 + 4  # read the fp32 running output, read a step's partial, write it back


def ring_merge_bytes(ctx: Context) -> float:
    """Ring context parallelism computes attention one K/V block at a time and merges each
    step's partial output into a running fp32 output rescaled by the log-sum-exps (Transformer
    Engine's P2P CP, plait's lowering/cp_attention.py): cp - 1 merges of this rank's query
    rows, memory-bound. Backward accumulates dq, dk, dv the same way (Work.backward's 2x). At
    long context per step this is a sizeable share of the attention core; Ulysses all-to-all
    computes whole heads and merges nothing."""
    lay = ctx.layout
    if lay.cp <= 1 or lay.cp_comm != "ring":
        return 0.0
    merges = counts.ring_exchanges(ctx.model, lay.cp, ctx.job.seq_len)  # cp - 1 without a window
    return merges * ctx.tokens * ctx.model.attention.out_dim / lay.tp * MERGE_BYTES


SCORE_BYTES_FWD = 9  # softmax read + write, dropout read + write + mask, per score element


def materialised_attention(ctx: Context) -> tuple[float, float]:
    """(GEMM seconds, memory-bound bytes) of attention without flash: QK^T and PV as batched
    GEMMs over the full s x s square, then scale-mask-softmax and dropout on the scores."""
    a, lay, s = ctx.model.attention, ctx.layout, ctx.job.seq_len // ctx.layout.cp
    batch = ctx.layout.mbs * a.heads / lay.tp
    gemms = (compute.gemm_time(ctx, s, s, a.head_dim, batch, ctx.peak_high)
             + compute.gemm_time(ctx, s, a.v_head_dim, s, batch, ctx.peak_high))
    return gemms, batch * s * s * SCORE_BYTES_FWD


def comm(ctx: Context, work: Work) -> tuple[dict, dict]:
    fwd = {"tp": collectives.tp_comm(ctx)}
    bwd = dict(fwd)
    if ctx.layout.cp > 1:
        ring = cp_comm(ctx)
        fwd["cp"], bwd["cp"] = ring, 2 * ring
        if ctx.layout.cp_comm == "ring":
            # each step's K/V send / recv runs beside the previous step's core kernels (forward;
            # backward: the backward kernels at their own rate, K/V and dK/dV): hidden as
            # measured for point-to-point traffic beside compute (overlap_p2p); the all-to-all
            # variant waits for its exchange
            bwd_core = BWD_CORE * work.core / work.core_bwd_rate
            fwd["cp"] = ring - collectives.hidden(ctx, "p2p", ring, work.core)
            bwd["cp"] = 2 * ring - collectives.hidden(ctx, "p2p", 2 * ring, bwd_core)
    return fwd, bwd


def cp_comm(ctx: Context) -> float:
    """Attention under context parallelism (forward). Ring: cp-1 exchanges of this rank's K and V
    chunk, fewer with a sliding window shorter than the zigzag chunks (counts.ring_steps).
    All-to-all (Ulysses, layout cp_comm): q, k, v from sequence to head sharding and the output
    back, each rank scattering its local tensors."""
    lay = ctx.layout
    if lay.cp <= 1:
        return 0.0
    attn = ctx.model.attention
    if lay.cp_comm == "alltoall":  # q, k, v in, the output back
        widths = attn.q_dim + attn.kv_dim + attn.v_dim + attn.out_dim
        return collectives.all_to_all(ctx, ctx.group("dense", "cp"),
                                      ctx.tokens * widths / lay.tp * ctx.act_bytes)
    # per-head K and V (multi-head latent attention: expanded from the latent before the exchange)
    kv = ctx.tokens * (attn.kv_dim + attn.v_dim) / lay.tp * ctx.act_bytes
    # a sliding window skips the steps whose K/V block no query sees (mean over attention layers)
    steps = counts.ring_exchanges(ctx.model, lay.cp, ctx.job.seq_len)
    return steps * collectives.p2p(ctx, ctx.group("dense", "cp"), kv)


experts_host = absent.no_experts_host


def cp_host(ctx: Context) -> float:
    """Ring CP runs each ring step as a pair kernel per chunk pair of this rank, an lse merge and
    the heads' reshapes, forward and backward: host work that grows with the steps. `plait
    calibrate` measures it at cp = 2, two steps (cp_host_us_attention); the all-to-all variant
    runs one whole-sequence kernel and adds only its exchanges."""
    lay = ctx.layout
    if lay.cp <= 1 or lay.cp_comm != "ring":
        return 0.0
    steps = counts.ring_exchanges(ctx.model, lay.cp, ctx.job.seq_len) + 1
    return ctx.cal.cp_host_us_attention * 1e-6 * steps / 2


def scores_bytes(ctx: Context) -> float:
    """Korthikanti's 5as^2b: scores, softmax and dropout mask of a stack without flash attention."""
    if ctx.cal.flash_attention >= 0.5:
        return 0.0
    a, lay = ctx.model.attention, ctx.layout
    return 5 * lay.mbs * a.heads / lay.tp * (ctx.job.seq_len / lay.cp) ** 2


def activations(ctx: Context) -> tuple[float, float]:
    none, selective = counts.layer_saved_bytes(ctx.model, "attention", memory.shape(ctx))
    return none + scores_bytes(ctx), selective  # selective re-runs the core: its scores never stay


def params_on_rank(ctx: Context) -> tuple[float, float]:
    return memory.dense_params_on_rank(ctx, "attention")


buffers = absent.no_buffers
topology_checks = absent.no_topology_checks
uncertain_ranges = absent.no_uncertain_ranges
