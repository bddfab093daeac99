"""Memory per rank: parameter state by data-parallel flavour, activations per block kind and
recompute choice, in-flight micro-batches of the pipeline schedule, buffers and a reserve.

Activations start from Korthikanti et al. ("Reducing Activation Recomputation in Large Transformer
Models") and are recounted tensor by tensor for what plait's modules save (ir/counts/activations.py, one
formula per layer kind, checked against torch's saved-tensor hooks on the real runtime in
tests/runtime/test_memory_truth.py): the fp32 norm statistics, the norm output each layer's
projections read, RoPE tables, K/V as the attention kernel keeps them, the SwiGLU product; MoE
and Mamba2 terms as ir/counts/activations.py documents them. With sequence parallelism the residual stream and
norm tensors are split over tp as well.
Dense parameters are sharded over the dense DP x CP group, expert parameters over EDP (MoE
Parallel Folding), which is exactly what Megatron's own estimator leaves out.
"""
from __future__ import annotations

from plait.ir import counts, kinds
from plait.ir.job import Precision

from .context import Context

GiB = float(2**30)


def shape(ctx: Context) -> counts.ActivationShape:
    """What one layer on this rank sees per micro-batch (ir/counts/activations.py's formulas);
    a kind's cost facet adds what only its layers see (MoE: the routed token copies)."""
    lay = ctx.layout
    return counts.ActivationShape(
        tokens=ctx.tokens, seq=ctx.job.seq_len / lay.cp, tp=lay.tp, sp=lay.sp,
        act_bytes=ctx.act_bytes, kv_expanded=ctx.cal.kv_expanded >= 0.5, etp=lay.etp, cp=lay.cp)


def block_activations(ctx: Context, kind: str) -> tuple[float, float]:
    """(stored with no recompute, stored with selective recompute) bytes per micro-batch of one
    layer of ``kind`` (its cost facet's ``activations``)."""
    return kinds.facet(kind, "cost").activations(ctx)


def unit_input(ctx: Context) -> float:
    """What full recompute keeps of a layer: its input on the residual stream. plait's runtime
    checkpoints every layer (attention and MLP of a decoder layer apart), so a unit of k layers
    keeps k of these (measured: tests/runtime/test_memory_truth.py)."""
    return counts.stream_bytes(ctx.model, shape(ctx))


def head_activations(ctx: Context) -> float:
    """What the last stage keeps for the final norm, head and loss per micro-batch."""
    return counts.head_saved_bytes(ctx.model, shape(ctx))


# ------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------

def block_fp32_kept_on_rank(ctx: Context, kind: str) -> float:
    return counts.fp32_kept_params(ctx.model, kind, ctx.layout.tp)


def fsdp_pad(ctx: Context, shapes, shards: int) -> float:
    """FSDP pads a tensor with no dim divisible by its shards (counts/fsdp.py): the padding joins
    the parameters so that ``(params + padding) / shards`` is the first rank's share."""
    return counts.fsdp_padding(shapes, shards) if ctx.layout.dp_kind == "fsdp" else 0.0


def block_params_on_rank(ctx: Context, kind: str) -> tuple[float, float]:
    """(dense, expert) parameters of one layer of ``kind`` held by one rank, FSDP's padding
    included (its cost facet's ``params_on_rank``)."""
    return kinds.facet(kind, "cost").params_on_rank(ctx)


def dense_params_on_rank(ctx: Context, kind: str) -> tuple[float, float]:
    """(dense, 0) parameters of one layer of a kind with no experts: its norm, its block's
    weights split over TP, FSDP's padding over DP x CP."""
    model, lay = ctx.model, ctx.layout
    norm = counts.norm_params(model)
    dense_shapes, _ = counts.layer_shapes(model, kind, lay.tp, lay.ep, lay.etp)
    dense_pad = fsdp_pad(ctx, dense_shapes, lay.dp * lay.cp)
    return norm + counts.block_params(model, kind) / lay.tp + dense_pad, 0.0


def embedding_params_on_rank(ctx: Context) -> float:
    lay = ctx.layout
    return (counts.embedding_params(ctx.model) / lay.tp
            + fsdp_pad(ctx, counts.embedding_shapes(ctx.model, lay.tp), lay.dp * lay.cp))


def head_params_on_rank(ctx: Context) -> float:
    """Final norm and output head; a tied head on a separate last stage keeps its own copy."""
    model, lay = ctx.model, ctx.layout
    head = counts.head_params(model)
    own_copy = model.tie_embeddings and lay.pp > 1
    if own_copy:
        head = model.vocab * model.hidden
    return (counts.final_norm_params(model) + head / lay.tp
            + fsdp_pad(ctx, counts.head_shapes(model, lay.tp, own_copy), lay.dp * lay.cp))


def state_tensors(ctx: Context, dense: float, expert: float, fp32_kept: float = 0.0) -> dict[str, float]:
    """Bytes per tensor class (counts.STATE_CLASSES: weights, grads, master, master_grads,
    moments) of (dense, expert) parameters on one rank: each class a function of the precision
    policy and the data-parallel flavour (counts.state_tensor_bytes); dense parameters shard over
    DP x CP, expert parameters over EDP. ``fp32_kept`` of the dense parameters stay fp32 in a
    bf16 / fp8 model (counts.fp32_kept_params): 2 more bytes each, except under FSDP2, whose
    resident weights are all fp32 shards anyway."""
    lay, prec = ctx.layout, ctx.job.precision or Precision("fp32")
    d = counts.state_tensor_bytes(prec, lay.dp_kind, lay.dp * lay.cp)
    e = counts.state_tensor_bytes(prec, lay.dp_kind, lay.edp)
    out = {key: dense * d[key] + expert * e[key] for key in counts.STATE_CLASSES}
    if prec.kind != "fp32" and lay.dp_kind != "fsdp":
        out["weights"] += fp32_kept * 2
    return out


def state_bytes(ctx: Context, dense: float, expert: float, fp32_kept: float = 0.0) -> dict[str, float]:
    """Weights, gradients and optimizer-side bytes (master copy, its gradient, Adam moments)."""
    t = state_tensors(ctx, dense, expert, fp32_kept)
    return {"weights": t["weights"], "grads": t["grads"],
            "optimizer": t["master"] + t["master_grads"] + t["moments"]}


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


def comm_buffers(ctx: Context, layer_kinds) -> float:
    """Sequence-parallel all-gather output and the buffers each of ``layer_kinds`` (the kinds
    of the model's layers) holds for its own communication (MoE: dispatch send / receive)."""
    out = ctx.tokens * ctx.model.hidden * ctx.act_bytes if ctx.layout.tp > 1 else 0.0
    for kind in layer_kinds:
        out += kinds.facet(kind, "cost").buffers(ctx)
    return out


def logits_buffer(ctx: Context) -> float:
    """The last stage per micro-batch: what the final norm, head and loss keep (the fp32
    log-softmax above all, counts.head_saved_bytes) plus the logits in the activation dtype
    before the loss upcasts them."""
    return head_activations(ctx) + ctx.tokens * ctx.model.vocab / ctx.layout.tp * ctx.act_bytes


def fsdp_buffers(ctx: Context, unit_params: list[float]) -> float:
    """FSDP's peak, in backward (runtime/fsdp.py shards the embedding, each model unit and the
    head as units of their own; ``unit_params`` their parameters on one rank, in forward order):
    while unit k runs its backward, its gathered weights, the unit before it (prefetched) and
    k's unsharded gradients are alive in the compute dtype, and the fp32 reduce-scatter input
    of unit k + 1, which FSDP2 keeps until the next reduce-scatter is issued. The largest such
    window (forward holds less: two gathered units). Measured: runtime/harness/memory_probe.py."""
    if ctx.layout.dp_kind != "fsdp" or not unit_params:
        return 0.0
    sizes = [0.0, *unit_params, 0.0]
    return max(ctx.act_bytes * (2 * sizes[k] + sizes[k - 1]) + 4 * sizes[k + 1]
               for k in range(1, len(sizes) - 1))


def reserve(ctx: Context, activations: float, buffers: float) -> float:
    return ctx.cal.reserve_gib * GiB + ctx.cal.fragmentation * (activations + buffers)
