"""Memory per rank: parameter state by data-parallel flavour, activations per block kind and
recompute choice, in-flight micro-batches of the pipeline schedule, buffers and a reserve.

Activations follow Korthikanti et al. ("Reducing Activation Recomputation in Large Transformer
Models"), recounted tensor by tensor for today's kernels (flash attention stores q, k, v, its output
and the log-sum-exp, never the s x s scores; no dropout) and extended to:
  * MoE: router logits, the dispatched token copies, the experts' FFN tensors (etp-sharded width,
    etp-gathered tokens: every etp rank sees the tokens its expert shard receives), the combine;
  * Mamba2: in_proj output, conv output, scan output, gated-norm inputs and the chunk states.
With sequence parallelism the residual stream and norm tensors are split over tp as well.
Dense parameters are sharded over the dense DP x CP group, expert parameters over EDP (MoE
Parallel Folding), which is exactly what Megatron's own estimator leaves out.
"""
from __future__ import annotations

from plait.ir import counts

from .context import Context

GiB = float(2**30)


def _stream(ctx: Context) -> float:
    """One residual-stream tensor held by a rank: tokens_sp x hidden."""
    return ctx.tokens_sp * ctx.model.hidden * ctx.act_bytes


def attention_activations(ctx: Context) -> tuple[float, float]:
    """(stored with no recompute, stored with selective recompute) bytes per micro-batch."""
    a, lay, t, b = ctx.model.attention, ctx.layout, ctx.tokens, ctx.act_bytes
    x, norm_out = _stream(ctx), _stream(ctx)
    qkv = t * (a.q_dim + 2 * a.kv_dim) / lay.tp * b
    out = t * a.q_dim / lay.tp * b
    lse = t * a.heads / lay.tp * 4
    none = x + norm_out + qkv + out + lse
    # selective recompute (as lowering/ implements it) re-runs the norm and the attention core:
    # neither the norm output nor the core's output and log-sum-exp stay
    if ctx.cal.flash_attention < 0.5:  # Korthikanti's 5as^2b: scores, softmax, dropout mask
        scores = 5 * ctx.layout.mbs * a.heads / lay.tp * (ctx.job.seq_len / lay.cp) ** 2
        return none + scores, none - norm_out - out - lse
    return none, none - norm_out - out - lse


def _ffn_activations(ctx: Context, tokens: float, width: float, gated: bool) -> tuple[float, float]:
    """(fc1 output, activation output) bytes of one FFN."""
    fc1 = tokens * width * (2 if gated else 1) * ctx.act_bytes
    return fc1, tokens * width * ctx.act_bytes


def mlp_activations(ctx: Context) -> tuple[float, float]:
    mlp = ctx.model.mlp
    fc1, act = _ffn_activations(ctx, ctx.tokens, mlp.ffn / ctx.layout.tp, mlp.gated)
    x, norm_out = _stream(ctx), _stream(ctx)
    none = x + norm_out + fc1 + act
    return none, none - norm_out - act


def moe_activations(ctx: Context) -> tuple[float, float]:
    model, lay, b = ctx.model, ctx.layout, ctx.act_bytes
    moe, h = model.moe, model.hidden
    x, norm_out = _stream(ctx), _stream(ctx)
    t_in = ctx.tokens / lay.tp
    router = t_in * moe.experts * 4 * 2  # fp32 logits and probabilities
    copies = ctx.routed_tokens
    dispatched = copies * h * b  # permuted tokens = expert fc1 input
    fc1, act = _ffn_activations(ctx, copies, moe.ffn / lay.etp, moe.gated)
    expert_out = copies * h * b  # fc2 output, weighted by the probabilities in the combine
    shared_fc1 = shared_act = 0.0
    if moe.shared_ffn:
        shared_fc1, shared_act = _ffn_activations(ctx, ctx.tokens, moe.shared_ffn / lay.tp, moe.gated)
    none = x + norm_out + router + dispatched + fc1 + act + expert_out + shared_fc1 + shared_act
    return none, none - norm_out - act - shared_act


def mamba_activations(ctx: Context) -> tuple[float, float]:
    m, lay, t, b = ctx.model.mamba, ctx.layout, ctx.tokens, ctx.act_bytes
    x, norm_out = _stream(ctx), _stream(ctx)
    in_proj = t * m.in_proj_out / lay.tp * b
    conv = t * m.conv_channels / lay.tp * b
    scan_out = t * m.d_inner / lay.tp * b
    gated_norm = 2 * t * m.d_inner / lay.tp * b  # its output feeds out_proj
    states = (t / m.chunk) * (m.heads / lay.tp) * m.head_dim * m.state * 4
    none = x + norm_out + in_proj + conv + scan_out + gated_norm + states
    return none, none - norm_out - t * m.d_inner / lay.tp * b


BLOCK_ACTIVATIONS = {"attention": attention_activations, "mlp": mlp_activations,
                     "moe": moe_activations, "mamba": mamba_activations}


def block_activations(ctx: Context, kind: str) -> tuple[float, float]:
    return BLOCK_ACTIVATIONS[kind](ctx)


def unit_input(ctx: Context) -> float:
    """What full recompute keeps of a unit: its input on the residual stream."""
    return _stream(ctx)


# ------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------

def block_params_on_rank(ctx: Context, kind: str) -> tuple[float, float]:
    """(dense, expert) parameters of one layer of ``kind`` held by one rank."""
    model, lay = ctx.model, ctx.layout
    norm = counts.norm_params(model)
    if kind != "moe":
        return norm + counts.block_params(model, kind) / lay.tp, 0.0
    dense = norm + counts.router_params(model) + counts.shared_expert_params(model) / lay.tp
    return dense, counts.expert_params(model) / (lay.ep * lay.etp)


def embedding_params_on_rank(ctx: Context) -> float:
    return counts.embedding_params(ctx.model) / ctx.layout.tp


def head_params_on_rank(ctx: Context) -> float:
    """Final norm and output head; a tied head on a separate last stage keeps its own copy."""
    model = ctx.model
    head = counts.head_params(model)
    if model.tie_embeddings and ctx.layout.pp > 1:
        head = model.vocab * model.hidden
    return counts.final_norm_params(model) + head / ctx.layout.tp


def state_bytes(ctx: Context, dense: float, expert: float) -> dict[str, float]:
    """Weights, gradients and optimizer bytes of (dense, expert) parameters on one rank."""
    lay, prec = ctx.layout, ctx.job.precision
    d = counts.param_state_bytes(prec, lay.dp_kind, lay.dp * lay.cp)
    e = counts.param_state_bytes(prec, lay.dp_kind, lay.edp)
    return {key: dense * d[key] + expert * e[key] for key in ("weights", "grads", "optimizer")}


# ------------------------------------------------------------------------------------------------
# Schedule, buffers, reserve
# ------------------------------------------------------------------------------------------------

def inflight(pp: int, vpp: int, microbatches: int, rank: int) -> float:
    """Micro-batches whose activations rank ``rank`` holds at its peak, in units of one
    micro-batch through all of the rank's layers. 1F1B: pp - rank. Interleaved (Megatron's
    warm-up of 2(pp - rank - 1) + (vpp - 1)pp + 1 chunk passes): pp + (pp - 1)/vpp on rank 0."""
    if pp == 1:
        return 1.0
    if vpp == 1:
        return float(min(pp - rank, microbatches))
    chunks = min((pp - rank - 1) * 2 + (vpp - 1) * pp + 1, microbatches * vpp)
    return chunks / vpp


def comm_buffers(ctx: Context, has_moe: bool) -> float:
    """Sequence-parallel all-gather output and MoE dispatch send/receive buffers."""
    out = ctx.tokens * ctx.model.hidden * ctx.act_bytes if ctx.layout.tp > 1 else 0.0
    if has_moe:
        out += 2 * ctx.routed_tokens / ctx.layout.etp * ctx.model.hidden * ctx.act_bytes
    return out


def logits_buffer(ctx: Context) -> float:
    """Logits of one micro-batch on the last stage: bf16 output plus the fp32 softmax kept for
    the cross-entropy backward."""
    return ctx.tokens * ctx.model.vocab / ctx.layout.tp * (ctx.act_bytes + 4)


def fsdp_buffers(ctx: Context, unit_dense: float, unit_expert: float) -> float:
    """FSDP: the gathered weights of the running and the prefetched unit, and the unsharded fp32
    gradients of one unit before its reduce-scatter."""
    if ctx.layout.dp_kind != "fsdp":
        return 0.0
    full = unit_dense + unit_expert
    return full * (2 * ctx.act_bytes + 4)


def reserve(ctx: Context, activations: float, buffers: float) -> float:
    return ctx.cal.reserve_gib * GiB + ctx.cal.fragmentation * (activations + buffers)
