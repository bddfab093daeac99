"""Causal attention over a context-parallel group, on the zigzag layout (see cp_ops.py).

Ring attention (Liu et al. 2023; Megatron-Core's "p2p" CP): each rank keeps its queries and passes
its K/V block around the ring; at step t it attends to the block of rank (rank - t) mod cp. Only
the chunk pairs the causal mask leaves anything of are computed: a query chunk after a key chunk
attends to all of it, the same chunk attends causally, an earlier chunk not at all. Partial
results merge through their log-sum-exp. The backward runs the ring again: K/V travel with their
gradient accumulators dK/dV, which arrive back at their owner after cp hops. Both directions are
one `plait::` custom op each, so the graph holds one readable node per attention layer.

All-to-all (Ulysses, Jacobs et al. 2023; Megatron-Core's "a2a" CP): q, k, v are exchanged from
sequence-sharded to head-sharded, every rank runs plain causal attention over the whole sequence
for heads / cp heads, and the output goes back. Needs the (TP-local) heads to divide by cp.

Arithmetic is fp32 (fp64 stays fp64); K/V travel in their own dtype. Each chunk pair runs
PyTorch's CPU flash-attention kernels (`aten::_scaled_dot_product_flash_attention_for_cpu` and its
backward, which return / take the log-sum-exp) on CPU, and explicit scores elsewhere (correct but
materialising the pair's scores; a flash-attn pair kernel is the CUDA upgrade).
"""
from __future__ import annotations

import torch

from .cp_ops import RingShift, natural_from_gathered, zigzag_chunks
from .modules.attention import causal_attention
from .modules.norms import upcast

NEG_INF = float("-inf")


def chunk_pairs(size: int, rank: int, src: int) -> list[tuple[int, int, bool]]:
    """(local query chunk, source key chunk, causal) for the pairs rank ``rank``'s queries compute
    against the K/V block of rank ``src``; pairs the causal mask empties are left out."""
    pairs = []
    for qi, qa in enumerate(zigzag_chunks(size, rank)):
        for ki, kb in enumerate(zigzag_chunks(size, src)):
            if qa >= kb:
                pairs.append((qi, ki, qa == kb))
    return pairs


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """[b, s, h, d] -> [b, h, s, d] at least fp32."""
    return upcast(t).transpose(1, 2)


def _repeat_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.repeat_interleave(heads // t.shape[1], dim=1) if t.shape[1] != heads else t


def _sum_heads(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Gradient of _repeat_heads: [b, h, s, d] -> [b, kv_heads, s, d]."""
    b, h, s, d = t.shape
    return t.view(b, kv_heads, h // kv_heads, s, d).sum(2) if h != kv_heads else t


def _scores(q, k, scale: float, causal: bool, allowed=None) -> torch.Tensor:
    """Scaled scores of a chunk pair, -inf where the causal mask (same chunk) or the document
    mask ``allowed`` [b, l, l] (packed documents) forbids."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(mask, NEG_INF)
    if allowed is not None:
        s = s.masked_fill(~allowed[:, None], NEG_INF)
    return s


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (a query that sees no key of this pair: documents) read as 0, so that
    exp(s - lse) is 0, not NaN, for it."""
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def _pair_forward_math(q, k, v, scale: float, causal: bool, allowed=None):
    s = _scores(q, k, scale, causal, allowed)
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - _finite(lse)[..., None]), v), lse


def _pair_backward_math(do, q, k, v, out, lse, scale: float, causal: bool, allowed=None):
    """Flash-attention backward of one chunk pair given the merged output and log-sum-exp."""
    p = torch.exp(_scores(q, k, scale, causal, allowed) - lse[..., None])
    delta = (do * out).sum(-1)
    dv = torch.matmul(p.transpose(-1, -2), do)
    ds = p * (torch.matmul(do, v.transpose(-1, -2)) - delta[..., None])
    return torch.matmul(ds, k) * scale, torch.matmul(ds.transpose(-1, -2), q) * scale, dv


def pair_forward(q, k, v, scale: float, causal: bool, allowed=None):
    """(out, lse) of queries q [b, h, l, d] over keys k, v [b, h, l, d] (causal: same chunk;
    ``allowed``: the document mask of the pair, computed with explicit scores)."""
    if allowed is not None:
        return _pair_forward_math(q, k, v, scale, causal, allowed)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale)
        return out, lse
    return _pair_forward_math(q, k, v, scale, causal)


def pair_backward(do, q, k, v, out, lse, scale: float, causal: bool, allowed=None):
    """(dq, dk, dv) of one chunk pair; ``out`` and ``lse`` are the merged (global) ones."""
    if allowed is not None:
        return _pair_backward_math(do, q, k, v, out, lse, scale, causal, allowed)
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, out, lse, 0.0, causal, scale=scale)
    return _pair_backward_math(do, q, k, v, out, lse, scale, causal)


def _merge(acc, out, lse):
    """Combine two partial attentions over disjoint key sets by their log-sum-exp."""
    if acc is None:
        return out, lse
    acc_out, acc_lse = acc
    new_lse = torch.logaddexp(acc_lse, lse)
    ref = _finite(new_lse)  # both -inf (no key seen yet under a document mask): weights 0
    return (acc_out * torch.exp(acc_lse - ref)[..., None]
            + out * torch.exp(lse - ref)[..., None]), new_lse


def _allowed(documents, docs_cur, qi: int, ki: int):
    """The document mask [b, l, l] of chunk pair (qi, ki), or None without documents."""
    if documents is None:
        return None
    dq, dk = documents.chunk(2, dim=1)[qi], docs_cur.chunk(2, dim=1)[ki]
    return dq[:, :, None] == dk[:, None, :]


def ring_forward(q, k, v, scale: float, axis: str, size: int, rank: int, documents=None):
    """(out [b, s, hq, d] in q's dtype, lse [b, hq, s] fp32) of this rank's queries.
    ``documents`` [b, s] (this rank's document keys) travel the ring with their K/V block."""
    qh = _heads_first(q).chunk(2, dim=2)
    heads = q.shape[2]
    acc = [None, None]
    ring = RingShift(axis, size, rank) if size > 1 else None
    block = [k, v] if documents is None else [k, v, documents]
    for step in range(size):
        pending = ring.start(block) if step < size - 1 else None
        src = (rank - step) % size
        kh = _repeat_heads(_heads_first(block[0]), heads).chunk(2, dim=2)
        vh = _repeat_heads(_heads_first(block[1]), heads).chunk(2, dim=2)
        docs_cur = block[2] if documents is not None else None
        for qi, ki, causal in chunk_pairs(size, rank, src):
            allowed = _allowed(documents, docs_cur, qi, ki)
            acc[qi] = _merge(acc[qi], *pair_forward(qh[qi], kh[ki], vh[ki], scale, causal, allowed))
        if pending is not None:
            block = ring.wait(pending)
    out = torch.cat([a[0] for a in acc], dim=2).transpose(1, 2).to(q.dtype)
    return out.contiguous(), torch.cat([a[1] for a in acc], dim=2).contiguous()


def ring_backward(dout, q, k, v, out, lse, scale: float, axis: str, size: int, rank: int,
                  documents=None):
    heads, kv_heads = q.shape[2], k.shape[2]
    qh, do = _heads_first(q).chunk(2, dim=2), _heads_first(dout).chunk(2, dim=2)
    lse_c, out_c = lse.chunk(2, dim=2), _heads_first(out).chunk(2, dim=2)
    dq = [torch.zeros_like(t) for t in qh]
    ring = RingShift(axis, size, rank) if size > 1 else None
    block = [k, v] if documents is None else [k, v, documents]
    dk_cur, dv_cur = torch.zeros_like(_heads_first(k)), torch.zeros_like(_heads_first(v))
    for step in range(size):
        pending = ring.start(block) if step < size - 1 else None
        src = (rank - step) % size
        kh = _repeat_heads(_heads_first(block[0]), heads).chunk(2, dim=2)
        vh = _repeat_heads(_heads_first(block[1]), heads).chunk(2, dim=2)
        docs_cur = block[2] if documents is not None else None
        dk, dv = [torch.zeros_like(t) for t in kh], [torch.zeros_like(t) for t in vh]
        for qi, ki, causal in chunk_pairs(size, rank, src):
            g = pair_backward(do[qi], qh[qi], kh[ki], vh[ki], out_c[qi], lse_c[qi], scale, causal,
                              _allowed(documents, docs_cur, qi, ki))
            dq[qi], dk[ki], dv[ki] = dq[qi] + g[0], dk[ki] + g[1], dv[ki] + g[2]
        dk_cur = dk_cur + _sum_heads(torch.cat(dk, dim=2), kv_heads)
        dv_cur = dv_cur + _sum_heads(torch.cat(dv, dim=2), kv_heads)
        if pending is not None:
            block = ring.wait(pending)
        if ring is not None:  # the accumulators follow their block; after cp hops they are home
            dk_cur, dv_cur = ring.wait(ring.start([dk_cur, dv_cur]))
    dq_out = torch.cat(dq, dim=2).transpose(1, 2).to(q.dtype).contiguous()
    return (dq_out, dk_cur.transpose(1, 2).to(k.dtype).contiguous(),
            dv_cur.transpose(1, 2).to(v.dtype).contiguous())


# ---- custom ops ------------------------------------------------------------------------------
@torch.library.custom_op("plait::ring_attention", mutates_args=())
def ring_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, axis: str,
                      size: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    return ring_forward(q, k, v, scale, axis, size, rank)


@ring_attention_op.register_fake
def _(q, k, v, scale, axis, size, rank):
    b, s, h, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, s), dtype=torch.promote_types(q.dtype, torch.float32))


@torch.library.custom_op("plait::ring_attention_backward", mutates_args=())
def ring_attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                               v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float,
                               axis: str, size: int, rank: int
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ring_backward(dout, q, k, v, out, lse, scale, axis, size, rank)


@ring_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, scale, axis, size, rank):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, *ctx.args = inputs
    ctx.save_for_backward(q, k, v, *output)


def _backward(ctx, dout, dlse):  # lse is an internal output: it carries no gradient
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.plait.ring_attention_backward(dout, q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None


ring_attention_op.register_autograd(_backward, setup_context=_setup)


# ---- what lowered graphs call ------------------------------------------------------------------
def ring_attention(q, k, v, scale: float, axis: str, size: int, rank: int) -> torch.Tensor:
    """Drop-in for causal_attention on zigzag-sharded q, k, v [b, s/cp, h, d]."""
    return torch.ops.plait.ring_attention(q, k, v, scale, axis, size, rank)[0]


def ulysses_attention(q, k, v, scale: float, axis: str, size: int, rank: int) -> torch.Tensor:
    """Drop-in for causal_attention on zigzag-sharded q, k, v: all-to-all to head sharding, causal
    attention over the natural-order sequence, all-to-all back."""
    if k.shape[2] % size:  # too few kv heads to split: give every query head its own
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
    q, k, v = (torch.ops.plait.all_to_all(t, axis, size, 2, 1) for t in (q, k, v))
    natural = natural_from_gathered(size, q.shape[1] // (2 * size), q.device)
    out = causal_attention(*(t.index_select(1, natural) for t in (q, k, v)), scale)
    out = out.index_select(1, torch.argsort(natural))
    return torch.ops.plait.all_to_all(out, axis, size, 1, 2)
