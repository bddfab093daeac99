"""Compute time per micro-batch on one rank: the GEMM, core and memory-bound primitives every
block kind's cost facet (plait/kinds/<kind>/cost.py ``work``) prices its layer with, the shared
FFN, norm and residual terms, the embedding, the head and the optimizer step.

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

from plait.ir import counts, kinds

from .context import Calibration, Context

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


def expert_loop_times(ctx: Context, rows: float, n: float, k: float,
                      experts: float) -> tuple[float, float]:
    """(forward, backward) seconds the routed experts' loop path spends copying around one
    linear's ``experts`` GEMMs (counts.expert_loop_traffic: the outputs' and input gradients'
    concatenations, the weight gradients' stack), at the memory rate; 0 where the experts run as
    one grouped GEMM (grouped_gemm = 1), which writes in place."""
    if ctx.cal.grouped_gemm >= 0.5 or rows <= 0:
        return 0.0, 0.0
    fwd, bwd = counts.expert_loop_traffic(rows, n, k, experts, ctx.act_bytes)
    return memory_time(ctx, fwd), memory_time(ctx, bwd)


def memory_time(ctx: Context, nbytes: float) -> float:
    return nbytes / (ctx.hbm * ctx.cal.hbm_eff)


def core_time(ctx: Context, flops: float, eff: float = 0.0) -> float:
    """Seconds of ``flops`` of the attention core / SSM scan at ``eff`` of the bf16 peak
    (0: attn_eff, the attention core's rate at long sequences)."""
    return flops / (ctx.peak_bf16 * (eff or ctx.cal.attn_eff))


def attention_eff(cal: Calibration, keys: float) -> float:
    """Fraction of the bf16 peak a fused attention kernel reaches (forward; backward at
    attn_bwd_ratio of it) when one call's queries each iterate over ``keys`` keys (the causal
    square's side: the kernel's sequence length): attn_eff / (1 + attn_knee / keys). Per query
    tile the kernel loads Q, rescales and writes O, and the causal diagonal's tiles are half
    masked; those fixed costs are amortised over keys / tile key tiles. The one formula the
    attention kind prices its core with and `plait calibrate` fits (runtime/calibrate_attention.py);
    the Mamba scan's chunks have a fixed length, so its scan_eff has no knee."""
    return cal.attn_eff / (1.0 + cal.attn_knee / max(1.0, keys))


def norm_and_residual(ctx: Context) -> tuple[float, float]:
    """(norm bytes, residual-add bytes) per block: read + write the residual stream."""
    return counts.norm_residual_traffic(ctx.tokens_sp, ctx.model.hidden, ctx.act_bytes)


def ffn_work(ctx: Context, tokens: float, width: float, gated: bool, count: float = 1.0,
             peak: float | None = None, routed: bool = False) -> Work:
    """(gate+)up and down GEMMs of ``count`` FFNs of ``width`` over ``tokens`` each (grouped
    when count > 1: the local experts) at ``peak`` (default: the linears'), with the activation
    function; ``routed``: the routed experts, whose loop path copies (expert_loop_times)."""
    h = ctx.model.hidden
    up = width * (2 if gated else 1)
    passes = [grouped_gemm_times(ctx, tokens, up, h, count, peak),
              grouped_gemm_times(ctx, tokens, h, width, count, peak)]
    if routed:
        passes += [expert_loop_times(ctx, tokens, up, h, count),
                   expert_loop_times(ctx, tokens, h, width, count)]
    gemm, gemm_bwd = sum_passes(*passes)
    act = memory_time(ctx, count * counts.activation_fn_traffic(tokens, up, width, ctx.act_bytes))
    flops = count * tokens * 2 * h * (up + width)
    return Work(gemm=gemm, memory=act, selective=act, flops=flops, gemm_bwd=gemm_bwd)


def block_work(ctx: Context, kind: str) -> Work:
    """Forward work of one layer of ``kind`` (its cost facet's ``work``)."""
    return kinds.facet(kind, "cost").work(ctx)


def embedding_work(ctx: Context) -> Work:
    """Lookup (write the residual stream) on the first stage."""
    return Work(memory=memory_time(ctx, 2 * ctx.tokens_sp * ctx.model.hidden * ctx.act_bytes))


def head_work(ctx: Context) -> Work:
    """Final norm, output GEMM and vocab-parallel cross-entropy (fp32 softmax) on the last stage."""
    model, lay, t = ctx.model, ctx.layout, ctx.tokens
    vocab = model.vocab / lay.tp
    gemm, gemm_bwd = gemm_times(ctx, t, vocab, model.hidden, peak=ctx.peak_high)  # stays bf16
    loss = t * vocab * (ctx.act_bytes + 4 + 4)
    norm, _ = norm_and_residual(ctx)
    return Work(gemm=gemm, gemm_bwd=gemm_bwd, memory=memory_time(ctx, loss + norm),
                flops=2 * t * vocab * model.hidden)


def optimizer_time(ctx: Context, params_on_rank: float, shards: float) -> float:
    """Adam step over this rank's shard, memory-bound: optimizer_bytes per parameter (the
    stack's optimizer, ir/counts: 30 for Megatron-Core's fused Adam, 40 for plait's runtime's
    clip and fused AdamW, counts.adamw_path)."""
    return memory_time(ctx, ctx.cal.optimizer_bytes * params_on_rank / max(1.0, shards))


def plus(w: Work, memory: float = 0.0, selective: float = 0.0) -> Work:
    return Work(gemm=w.gemm, core=w.core, memory=w.memory + memory,
                selective=w.selective + selective, flops=w.flops, gemm_bwd=w.gemm_bwd)


def sum_passes(*passes: tuple[float, float]) -> tuple[float, float]:
    """(forward, backward) seconds of several GEMMs together."""
    return sum(p[0] for p in passes), sum(p[1] for p in passes)
