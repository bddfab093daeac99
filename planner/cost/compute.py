"""Compute time per block kind, per micro-batch, on one rank.

GEMMs: FLOPs over peak times an efficiency that falls with small dimensions (tile quantisation,
low arithmetic intensity), floored by the roofline's memory time. The attention core (flash
attention) and Mamba's chunked scan run at their own efficiency. Norms, activations, RoPE,
residual adds, softmax-top-k and token permutation are memory-bound: bytes over HBM bandwidth.

Backward: GEMMs twice the forward's arithmetic (data and weight gradients), the weight gradient
with its fp32 accumulation on the memory side; the flash-attention core 2.5x (it recomputes the
scores), memory-bound kernels twice. FLOP totals agree with ir/counts (the tests
check it); this module only decides how fast they run.
"""
from __future__ import annotations

from dataclasses import dataclass

from plait.ir import counts

from .context import Context

BWD_GEMM, BWD_CORE, BWD_MEMORY = 2.0, 2.5, 2.0


@dataclass(frozen=True)
class Work:
    """Forward seconds of one block on one rank, split by how each part runs."""

    gemm: float = 0.0
    core: float = 0.0  # attention core / SSM scan
    memory: float = 0.0  # memory-bound kernels
    selective: float = 0.0  # memory-bound work that selective recompute repeats (norms, activations)
    flops: float = 0.0  # forward FLOPs this rank executes (for checks)
    core_bwd_rate: float = 1.0  # the backward core kernels' rate over the forward's
    gemm_bwd: float = -1.0  # backward seconds of the GEMMs (dgrad + wgrad); < 0: BWD_GEMM x gemm

    @property
    def backward_gemm(self) -> float:
        return self.gemm_bwd if self.gemm_bwd >= 0 else BWD_GEMM * self.gemm

    @property
    def forward(self) -> float:
        return self.gemm + self.core + self.memory

    @property
    def backward(self) -> float:
        return self.backward_gemm + BWD_CORE * self.core / self.core_bwd_rate + BWD_MEMORY * self.memory


# Every weight gradient is accumulated into an fp32 main-gradient buffer (Megatron-Core's
# gradient_accumulation_fusion writes the wgrad GEMM's output straight into main_grad; without it
# a separate add does the same and more): the wgrad GEMM reads and writes 4 + 4 bytes per weight.
# With few rows per weight (small micro-batches, fine-grained experts) that traffic, not the
# arithmetic, sets the backward's time.
WGRAD_ACCUM_BYTES = 8


def _efficiency(ctx: Context, m: float, n: float, k: float) -> float:
    cal = ctx.cal
    return cal.gemm_eff / (1.0 + cal.gemm_knee * (1.0 / m + 1.0 / n + 1.0 / k))


def _roofline(ctx: Context, flops: float, eff: float, nbytes: float, peak: float | None) -> float:
    compute = flops / ((ctx.peak if peak is None else peak) * eff)
    return max(compute, nbytes / (ctx.hbm * ctx.cal.hbm_eff))


def _pass_bytes(ctx: Context, rows: float, n: float, k: float) -> tuple[float, float]:
    """(forward or dgrad bytes, wgrad bytes) of one [rows x k] @ [k x n] and its backward:
    forward reads X and W and writes Y; dgrad reads dY and W and writes dX (the same sizes);
    wgrad reads X and dY and accumulates dW into fp32."""
    b = ctx.act_bytes
    return (b * (rows * k + k * n + rows * n),
            b * (rows * k + rows * n) + WGRAD_ACCUM_BYTES * k * n)


def gemm_times(ctx: Context, m: float, n: float, k: float, count: float = 1.0,
               peak: float | None = None) -> tuple[float, float]:
    """(forward, backward) seconds of ``count`` GEMMs of [m x k] @ [k x n] with a weight
    [k x n] at ``peak`` (default: the linears' peak, fp8's in an fp8 layer). Each pass is
    the longer of its arithmetic (efficiency falling with small dimensions) and its memory
    traffic; backward is dgrad + wgrad."""
    if m <= 0 or n <= 0 or k <= 0:
        return 0.0, 0.0
    flops, eff = 2.0 * m * n * k, _efficiency(ctx, m, n, k)
    fwd_bytes, wgrad_bytes = _pass_bytes(ctx, m, n, k)
    fwd = _roofline(ctx, flops, eff, fwd_bytes, peak)
    return count * fwd, count * (fwd + _roofline(ctx, flops, eff, wgrad_bytes, peak))


def gemm_time(ctx: Context, m: float, n: float, k: float, count: float = 1.0,
              peak: float | None = None) -> float:
    """Forward seconds of ``count`` GEMMs of [m x k] @ [k x n] (see gemm_times)."""
    return gemm_times(ctx, m, n, k, count, peak)[0]


def grouped_gemm_times(ctx: Context, rows: float, n: float, k: float, groups: float,
                       peak: float | None = None) -> tuple[float, float]:
    """(forward, backward) seconds of ``groups`` GEMMs of [rows x k] @ [k x n] (the local
    experts, ``rows`` tokens each, a weight each).

    As one grouped GEMM kernel the GPU fills across groups, so the small-dimension knee sees the
    rows of all groups together; the price is each group's rows padded to a whole tile. As a loop
    (grouped_gemm = 0) every expert is its own GEMM and pays the knee on its own rows. The
    memory side reads every expert's weight (and accumulates its fp32 gradient) whatever the
    rows: with few tokens per expert the experts' GEMMs are memory-bound."""
    cal = ctx.cal
    if cal.grouped_gemm < 0.5 or groups <= 1 or rows <= 0:
        return gemm_times(ctx, rows, n, k, groups, peak)
    total = -(-rows // cal.gemm_tile) * cal.gemm_tile * groups
    flops, eff = 2.0 * total * n * k, _efficiency(ctx, total, n, k)
    fwd_bytes, wgrad_bytes = _pass_bytes(ctx, rows, n, k)
    fwd = _roofline(ctx, flops, eff, groups * fwd_bytes, peak)
    return fwd, fwd + _roofline(ctx, flops, eff, groups * wgrad_bytes, peak)


def grouped_gemm_time(ctx: Context, rows: float, n: float, k: float, groups: float,
                      peak: float | None = None) -> float:
    """Forward seconds of the local experts' grouped GEMM (see grouped_gemm_times)."""
    return grouped_gemm_times(ctx, rows, n, k, groups, peak)[0]


def memory_time(ctx: Context, nbytes: float) -> float:
    return nbytes / (ctx.hbm * ctx.cal.hbm_eff)


def core_time(ctx: Context, flops: float, eff: float = 0.0) -> float:
    return flops / (ctx.peak_bf16 * (eff or ctx.cal.attn_eff))


def _norm_and_residual(ctx: Context) -> tuple[float, float]:
    """(norm bytes, residual-add bytes) per block: read + write the residual stream."""
    per = ctx.tokens_sp * ctx.model.hidden * ctx.act_bytes
    return 2 * per, 3 * per


def attention_work(ctx: Context) -> Work:
    model, lay, t = ctx.model, ctx.layout, ctx.tokens
    a, h = model.attention, model.hidden
    gemms = counts.attention_gemms(a, h, lay.tp)  # GQA's q/k/v and o, or MLA's projections
    gemm, gemm_bwd = _sum(*(gemm_times(ctx, t, n_out, n_in) for n_out, n_in in gemms))
    core_flops = t * counts.attention_core_flops(model, ctx.job.seq_len) / lay.tp
    norm, residual = _norm_and_residual(ctx)
    norm += _latent_norm_bytes(ctx)
    rope = 2 * t * counts.rotated_width(a, lay.tp) * ctx.act_bytes if a.rope else 0.0
    flops = t * sum(2 * n_out * n_in for n_out, n_in in gemms) + core_flops
    if ctx.cal.flash_attention < 0.5:
        scores, score_mem = materialised_attention(ctx)
        return Work(gemm=gemm + scores, memory=memory_time(ctx, norm + residual + rope + score_mem),
                    selective=scores + memory_time(ctx, norm + score_mem), flops=flops,
                    gemm_bwd=gemm_bwd + BWD_GEMM * scores)
    core = core_time(ctx, core_flops)
    merge = ring_merge_bytes(ctx)
    # selective recompute re-runs the norm and the attention core (see memory.py)
    return Work(gemm=gemm, core=core, memory=memory_time(ctx, norm + residual + rope + merge),
                selective=core + memory_time(ctx, norm), flops=flops,
                core_bwd_rate=ctx.cal.attn_bwd_ratio, gemm_bwd=gemm_bwd)


def _latent_norm_bytes(ctx: Context) -> float:
    """Multi-head latent attention's q and kv latent RMSNorms (replicated over TP): read + write."""
    a = ctx.model.attention
    return 2 * ctx.tokens * sum(counts.latent_widths(a)) * ctx.act_bytes if a.latent is not None else 0.0


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
    gemms = (gemm_time(ctx, s, s, a.head_dim, batch, ctx.peak_high)
             + gemm_time(ctx, s, a.v_head_dim, s, batch, ctx.peak_high))
    return gemms, batch * s * s * SCORE_BYTES_FWD


def _ffn_work(ctx: Context, tokens: float, width: float, gated: bool, count: float = 1.0,
              peak: float | None = None) -> Work:
    """(gate+)up and down GEMMs of ``count`` FFNs of ``width`` over ``tokens`` each (grouped
    when count > 1: the local experts) at ``peak`` (default: the linears'), with the activation
    function."""
    h = ctx.model.hidden
    up = width * (2 if gated else 1)
    gemm, gemm_bwd = _sum(grouped_gemm_times(ctx, tokens, up, h, count, peak),
                          grouped_gemm_times(ctx, tokens, h, width, count, peak))
    act = memory_time(ctx, count * tokens * (up + width) * ctx.act_bytes)
    flops = count * tokens * 2 * h * (up + width)
    return Work(gemm=gemm, memory=act, selective=act, flops=flops, gemm_bwd=gemm_bwd)


def mlp_work(ctx: Context) -> Work:
    mlp = ctx.model.mlp
    ffn = _ffn_work(ctx, ctx.tokens, mlp.ffn / ctx.layout.tp, mlp.gated)
    norm, residual = _norm_and_residual(ctx)
    return _plus(ffn, memory=memory_time(ctx, norm + residual), selective=memory_time(ctx, norm))


def moe_work(ctx: Context) -> Work:
    model, lay = ctx.model, ctx.layout
    moe, h = model.moe, model.hidden
    t_in = ctx.tokens / lay.tp
    local = moe.experts // lay.ep
    # expert grouped GEMMs and the fp32 router never run in fp8 (ir/precision.py)
    experts = _ffn_work(ctx, ctx.routed_tokens / local, moe.ffn / lay.etp, moe.gated, local,
                        ctx.peak_high)
    router = gemm_times(ctx, t_in, moe.experts, h, peak=ctx.peak_high)
    shared = (_ffn_work(ctx, ctx.tokens, moe.shared_ffn / lay.tp, moe.gated) if moe.shared_ffn
              else Work())
    norm, residual = _norm_and_residual(ctx)
    # permute + unpermute + probability-weighted combine: read and write every routed copy; with
    # more than one local expert and EP > 1 the received chunks are sorted by expert after the
    # all-to-all and unsorted before it (Megatron-Core's sort_chunks_by_idxs): twice the traffic
    sorts = 2 if lay.ep > 1 and local > 1 and lay.dispatcher == "alltoall" else 1
    permute = 4 * sorts * ctx.routed_tokens / lay.etp * h * ctx.act_bytes
    routing = t_in * moe.experts * 4 * 3  # fp32 logits, softmax, top-k
    flops = experts.flops + shared.flops + t_in * 2 * h * moe.experts
    return Work(gemm=experts.gemm + router[0] + shared.gemm,
                gemm_bwd=experts.backward_gemm + router[1] + shared.backward_gemm,
                memory=experts.memory + shared.memory + memory_time(
                    ctx, norm + residual + permute + routing),
                selective=experts.selective + shared.selective + memory_time(ctx, norm),
                flops=flops)


def mamba_work(ctx: Context) -> Work:
    model, lay, t = ctx.model, ctx.layout, ctx.tokens
    m, h = model.mamba, model.hidden
    gemm, gemm_bwd = _sum(gemm_times(ctx, t, m.in_proj_out / lay.tp, h),
                          gemm_times(ctx, t, h, m.d_inner / lay.tp))
    # SSD chunked scan: intra-chunk (chunk-length "attention") and inter-chunk state products
    scan_flops = t * 2 * (m.d_inner / lay.tp) * (2 * m.chunk + 2 * m.state)
    conv = 2 * t * m.conv_channels / lay.tp * ctx.act_bytes
    gated_norm = 3 * t * m.d_inner / lay.tp * ctx.act_bytes
    norm, residual = _norm_and_residual(ctx)
    flops = t * (2 * h * m.in_proj_out + 2 * m.d_inner * h) / lay.tp + scan_flops
    return Work(gemm=gemm, gemm_bwd=gemm_bwd, core=core_time(ctx, scan_flops, ctx.cal.scan_eff),
                memory=memory_time(ctx, conv + gated_norm + norm + residual),
                selective=memory_time(ctx, norm + gated_norm), flops=flops)


BLOCK_WORK = {"attention": attention_work, "mlp": mlp_work, "moe": moe_work, "mamba": mamba_work}


def block_work(ctx: Context, kind: str) -> Work:
    return BLOCK_WORK[kind](ctx)


def embedding_work(ctx: Context) -> Work:
    """Lookup (write the residual stream) on the first stage."""
    return Work(memory=memory_time(ctx, 2 * ctx.tokens_sp * ctx.model.hidden * ctx.act_bytes))


def head_work(ctx: Context) -> Work:
    """Final norm, output GEMM and vocab-parallel cross-entropy (fp32 softmax) on the last stage."""
    model, lay, t = ctx.model, ctx.layout, ctx.tokens
    vocab = model.vocab / lay.tp
    gemm, gemm_bwd = gemm_times(ctx, t, vocab, model.hidden, peak=ctx.peak_high)  # stays bf16
    loss = t * vocab * (ctx.act_bytes + 4 + 4)
    norm, _ = _norm_and_residual(ctx)
    return Work(gemm=gemm, gemm_bwd=gemm_bwd, memory=memory_time(ctx, loss + norm),
                flops=2 * t * vocab * model.hidden)


def optimizer_time(ctx: Context, params_on_rank: float, shards: float) -> float:
    """Adam step over this rank's shard: read grads, master weights, m, v (fp32), write them and
    the bf16 weights: ~30 bytes per parameter, memory-bound."""
    return memory_time(ctx, 30.0 * params_on_rank / max(1.0, shards))


def _plus(w: Work, memory: float = 0.0, selective: float = 0.0) -> Work:
    return Work(gemm=w.gemm, core=w.core, memory=w.memory + memory,
                selective=w.selective + selective, flops=w.flops, gemm_bwd=w.gemm_bwd)


def _sum(*passes: tuple[float, float]) -> tuple[float, float]:
    """(forward, backward) seconds of several GEMMs together."""
    return sum(p[0] for p in passes), sum(p[1] for p in passes)
