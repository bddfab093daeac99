"""Causal attention over a context-parallel group, on the zigzag layout (see cp_ops.py).

Ring attention (Liu et al. 2023; Megatron-Core's "p2p" CP): each rank keeps its queries and at
step t receives the K/V block of rank (rank - t) mod cp, straight from it (every rank sends its
own block t ranks ahead). Only the chunk pairs the mask leaves anything of are computed: a query
chunk after a key chunk attends to all of it (or to a band, with a sliding window), the same
chunk attends causally, an earlier chunk not at all. With a window, the steps whose blocks hold
no visible pair for any rank are skipped, exchange and all (ir/counts.ring_steps: with zigzag
chunks longer than the window, 2 of cp - 1). Partial results merge through their log-sum-exp.
The backward takes the same steps: each rank computes dK/dV of the block it received and sends
them back to its owner. Both directions are one `plait::` custom op each, so the graph holds one
readable node per attention layer.

All-to-all (Ulysses, Jacobs et al. 2023; Megatron-Core's "a2a" CP): q, k, v are exchanged from
sequence-sharded to head-sharded, every rank runs plain causal attention over the whole sequence
for heads / cp heads, and the output goes back. Needs the (TP-local) heads to divide by cp.

Arithmetic is fp32 (fp64 stays fp64); K/V travel in their own dtype. Each chunk pair runs
PyTorch's CPU flash-attention kernels (`aten::_scaled_dot_product_flash_attention_for_cpu` and its
backward, which return / take the log-sum-exp; a banded pair passes its mask) on CPU, and explicit
scores elsewhere (correct but materialising the pair's scores; a flash-attn pair kernel with
window_size is the CUDA upgrade).
"""
from __future__ import annotations

from typing import Optional

import torch

from plait.ir.counts import ring_steps

from .cp_ops import PeerExchange, natural_from_gathered, zigzag_chunks
from .modules.attention import band_mask, causal_attention
from .modules.norms import upcast

NEG_INF = float("-inf")


def _sees(offset: int, chunk: int, window: Optional[int]) -> bool:
    """Whether a query chunk ``offset`` tokens after a key chunk of the same length sees any of it."""
    return offset >= 0 and (window is None or offset - (chunk - 1) < window)


def chunk_pairs(size: int, rank: int, src: int, chunk: int = 1,
                window: Optional[int] = None) -> list[tuple[int, int, int]]:
    """(local query chunk, source key chunk, offset) for the pairs rank ``rank``'s queries compute
    against the K/V block of rank ``src``, ``offset`` = the query chunk's first position minus the
    key chunk's (chunks of ``chunk`` tokens); pairs the mask empties are left out."""
    pairs = []
    for qi, qa in enumerate(zigzag_chunks(size, rank)):
        for ki, kb in enumerate(zigzag_chunks(size, src)):
            if _sees((qa - kb) * chunk, chunk, window):
                pairs.append((qi, ki, (qa - kb) * chunk))
    return pairs


def pair_visibility(chunk: int, offset: int, window: Optional[int]) -> str:
    """"causal" (the same chunk, no window inside it), "all" (an earlier chunk wholly inside the
    window) or "band" (anything else: a mask the flash kernels cannot express)."""
    inside = window is None or offset + chunk - 1 < window
    if offset == 0 and (window is None or chunk <= window):
        return "causal"
    return "all" if offset >= chunk and inside else "band"


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """[b, s, h, d] -> [b, h, s, d] at least fp32."""
    return upcast(t).transpose(1, 2)


def _repeat_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.repeat_interleave(heads // t.shape[1], dim=1) if t.shape[1] != heads else t


def _sum_heads(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Gradient of _repeat_heads: [b, h, s, d] -> [b, kv_heads, s, d]."""
    b, h, s, d = t.shape
    return t.view(b, kv_heads, h // kv_heads, s, d).sum(2) if h != kv_heads else t


def _scores(q, k, scale: float, offset: int, window: Optional[int], allowed=None) -> torch.Tensor:
    """Scaled scores of a chunk pair, -inf where the causal band or the document mask
    ``allowed`` [b, l, l] (packed documents, cp_documents.py) hides a key."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    visible = band_mask(s.shape[-2], s.shape[-1], offset, window, s.device)
    if allowed is not None:
        visible = visible & allowed[:, None]
    return s.masked_fill(~visible, NEG_INF)


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with the -inf of rows that see no key (a band pair's corner) as 0: exp(-inf - 0) = 0."""
    return lse.masked_fill(lse == NEG_INF, 0.0)


def _pair_forward_math(q, k, v, scale: float, offset: int, window: Optional[int], allowed=None):
    s = _scores(q, k, scale, offset, window, allowed)
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - _finite(lse)[..., None]), v), lse


def _pair_backward_math(do, q, k, v, out, lse, scale: float, offset: int, window: Optional[int],
                        allowed=None):
    """Flash-attention backward of one chunk pair given the merged output and log-sum-exp."""
    p = torch.exp(_scores(q, k, scale, offset, window, allowed) - lse[..., None])
    delta = (do * out).sum(-1)
    dv = torch.matmul(p.transpose(-1, -2), do)
    ds = p * (torch.matmul(do, v.transpose(-1, -2)) - delta[..., None])
    return torch.matmul(ds, k) * scale, torch.matmul(ds.transpose(-1, -2), q) * scale, dv


def _cpu_flash_args(q, offset: int, window: Optional[int]):
    """(is_causal, additive mask or None) for PyTorch's CPU flash kernels on this pair."""
    kind = pair_visibility(q.shape[2], offset, window)
    if kind != "band":
        return kind == "causal", None
    visible = band_mask(q.shape[2], q.shape[2], offset, window, q.device)
    return False, torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill(~visible, NEG_INF)


def pair_forward(q, k, v, scale: float, offset: int, window: Optional[int] = None, allowed=None):
    """(out, lse) of queries q [b, h, l, d] over keys k, v [b, h, l, d] ``offset`` positions
    before them (0: the same chunk), within ``window``; ``allowed``: the pair's document mask
    (explicit scores)."""
    if q.device.type != "cpu" or allowed is not None:
        return _pair_forward_math(q, k, v, scale, offset, window, allowed)
    causal, mask = _cpu_flash_args(q, offset, window)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    if mask is not None:  # the kernel gives a row that sees no key lse 0; it weighs nothing: -inf
        lse = lse.masked_fill(mask.isinf().all(-1), NEG_INF)
    return out, lse


def pair_backward(do, q, k, v, out, lse, scale: float, offset: int, window: Optional[int] = None,
                  allowed=None):
    """(dq, dk, dv) of one chunk pair; ``out`` and ``lse`` are the merged (global) ones."""
    if q.device.type != "cpu" or allowed is not None:
        return _pair_backward_math(do, q, k, v, out, lse, scale, offset, window, allowed)
    causal, mask = _cpu_flash_args(q, offset, window)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale)


def _merge(acc, out, lse):
    """Combine two partial attentions over disjoint key sets by their log-sum-exp (a row that
    has seen no key yet carries lse = -inf and weighs nothing)."""
    if acc is None:
        return out, lse
    acc_out, acc_lse = acc
    new_lse = torch.logaddexp(acc_lse, lse)
    safe = _finite(new_lse)
    return (acc_out * torch.exp(acc_lse - safe)[..., None]
            + out * torch.exp(lse - safe)[..., None]), new_lse


def _blocks_by_step(exchange, steps: tuple[int, ...], tensors: list[torch.Tensor]):
    """(step, the tensors of rank - step) for each step (steps[0] = 0: this rank's own); the next
    step's exchange starts before the current block is handed out, so it overlaps the compute."""
    pending = None
    for i, step in enumerate(steps):
        current = tensors if step == 0 else exchange.wait(pending)
        pending = exchange.start(steps[i + 1], tensors) if i + 1 < len(steps) else None
        yield step, current


def _steps(exchange, q, window: Optional[int]) -> tuple[int, ...]:
    return ring_steps(exchange.size, q.shape[1] * exchange.size, window)


def _allowed(documents, block: list, qi: int, ki: int):
    """The document mask [b, l, l] of chunk pair (qi, ki), or None without documents; the source
    block's document keys travel with its K/V (block[2])."""
    if documents is None:
        return None
    dq, dk = documents.chunk(2, dim=1)[qi], block[2].chunk(2, dim=1)[ki]
    return dq[:, :, None] == dk[:, None, :]


def ring_forward(q, k, v, scale: float, exchange, window: Optional[int] = None, documents=None):
    """(out [b, s, hq, d] in q's dtype, lse [b, hq, s] fp32) of this rank's queries; ``exchange``
    (cp_ops.PeerExchange) knows the CP size and this rank. ``documents`` [b, s]: this rank's
    document keys (packed documents), sent along with K/V."""
    size, rank, chunk = exchange.size, exchange.rank, q.shape[1] // 2
    qh = _heads_first(q).chunk(2, dim=2)
    heads = q.shape[2]
    acc = [None, None]
    own = [k, v] if documents is None else [k, v, documents]
    for step, block in _blocks_by_step(exchange, _steps(exchange, q, window), own):
        src = (rank - step) % size
        kh = _repeat_heads(_heads_first(block[0]), heads).chunk(2, dim=2)
        vh = _repeat_heads(_heads_first(block[1]), heads).chunk(2, dim=2)
        for qi, ki, offset in chunk_pairs(size, rank, src, chunk, window):
            acc[qi] = _merge(acc[qi], *pair_forward(qh[qi], kh[ki], vh[ki], scale, offset, window,
                                                    _allowed(documents, block, qi, ki)))
    out = torch.cat([a[0] for a in acc], dim=2).transpose(1, 2).to(q.dtype)
    return out.contiguous(), torch.cat([a[1] for a in acc], dim=2).contiguous()


def ring_backward(dout, q, k, v, out, lse, scale: float, exchange, window: Optional[int] = None,
                  documents=None):
    size, rank, chunk = exchange.size, exchange.rank, q.shape[1] // 2
    heads, kv_heads = q.shape[2], k.shape[2]
    qh, do = _heads_first(q).chunk(2, dim=2), _heads_first(dout).chunk(2, dim=2)
    lse_c, out_c = lse.chunk(2, dim=2), _heads_first(out).chunk(2, dim=2)
    dq = [torch.zeros_like(t) for t in qh]
    dk_own, dv_own = torch.zeros_like(_heads_first(k)), torch.zeros_like(_heads_first(v))
    own = [k, v] if documents is None else [k, v, documents]
    for step, block in _blocks_by_step(exchange, _steps(exchange, q, window), own):
        src = (rank - step) % size
        kh = _repeat_heads(_heads_first(block[0]), heads).chunk(2, dim=2)
        vh = _repeat_heads(_heads_first(block[1]), heads).chunk(2, dim=2)
        dk, dv = [torch.zeros_like(t) for t in kh], [torch.zeros_like(t) for t in vh]
        for qi, ki, offset in chunk_pairs(size, rank, src, chunk, window):
            g = pair_backward(do[qi], qh[qi], kh[ki], vh[ki], out_c[qi], lse_c[qi], scale, offset,
                              window, _allowed(documents, block, qi, ki))
            dq[qi], dk[ki], dv[ki] = dq[qi] + g[0], dk[ki] + g[1], dv[ki] + g[2]
        grads = [_sum_heads(torch.cat(dk, dim=2), kv_heads), _sum_heads(torch.cat(dv, dim=2), kv_heads)]
        if step:  # dK/dV of rank src's block go back to it; this rank's come from rank + step
            grads = exchange.wait(exchange.start(-step, grads))
        dk_own, dv_own = dk_own + grads[0], dv_own + grads[1]
    dq_out = torch.cat(dq, dim=2).transpose(1, 2).to(q.dtype).contiguous()
    return (dq_out, dk_own.transpose(1, 2).to(k.dtype).contiguous(),
            dv_own.transpose(1, 2).to(v.dtype).contiguous())


# ---- custom ops ------------------------------------------------------------------------------
@torch.library.custom_op("plait::ring_attention", mutates_args=())
def ring_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, axis: str,
                      size: int, rank: int, window: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return ring_forward(q, k, v, scale, PeerExchange(axis, size, rank), window)


@ring_attention_op.register_fake
def _(q, k, v, scale, axis, size, rank, window):
    b, s, h, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, s), dtype=torch.promote_types(q.dtype, torch.float32))


@torch.library.custom_op("plait::ring_attention_backward", mutates_args=())
def ring_attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                               v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float,
                               axis: str, size: int, rank: int, window: Optional[int]
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ring_backward(dout, q, k, v, out, lse, scale, PeerExchange(axis, size, rank), window)


@ring_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, scale, axis, size, rank, window):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, *ctx.args = inputs
    ctx.save_for_backward(q, k, v, *output)


def _backward(ctx, dout, dlse):  # lse is an internal output: it carries no gradient
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.plait.ring_attention_backward(dout, q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


ring_attention_op.register_autograd(_backward, setup_context=_setup)


# ---- what lowered graphs call ------------------------------------------------------------------
def ring_attention(q, k, v, scale: float, axis: str, size: int, rank: int,
                   window: Optional[int] = None) -> torch.Tensor:
    """Drop-in for causal_attention on zigzag-sharded q, k, v [b, s/cp, h, d]."""
    return torch.ops.plait.ring_attention(q, k, v, scale, axis, size, rank, window)[0]


def ulysses_attention(q, k, v, scale: float, axis: str, size: int, rank: int,
                      window: Optional[int] = None) -> torch.Tensor:
    """Drop-in for causal_attention on zigzag-sharded q, k, v: all-to-all to head sharding, causal
    attention (within ``window``) over the natural-order sequence, all-to-all back."""
    if k.shape[2] % size:  # too few kv heads to split: give every query head its own
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
    q, k, v = (torch.ops.plait.all_to_all(t, axis, size, 2, 1) for t in (q, k, v))
    natural = natural_from_gathered(size, q.shape[1] // (2 * size), q.device)
    out = causal_attention(*(t.index_select(1, natural) for t in (q, k, v)), scale, window)
    out = out.index_select(1, torch.argsort(natural))
    return torch.ops.plait.all_to_all(out, axis, size, 1, 2)
