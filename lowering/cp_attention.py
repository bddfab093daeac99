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

K/V travel in their own dtype. Each chunk pair runs a pair kernel (cp_pairs.py): by default
PyTorch's CPU flash-attention kernels on CPU (a banded pair passes its mask) and explicit scores
elsewhere, both in fp32 (fp64 stays fp64); on CUDA runtime/kernels.py binds SDPA's flash backend,
which computes on the bf16 / fp16 activations (band pairs of a sliding window: the math, fp32).
Partial outputs merge, and gradients accumulate, in fp32 either way.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from plait.ir.counts import ring_steps

from . import cp_pairs
from .cp_ops import PeerExchange, natural_from_gathered, zigzag_chunks
from .cp_pairs import finite as _finite
from .cp_pairs import pair_visibility  # noqa: F401  (part of this module's vocabulary)
from .modules.attention import causal_attention


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


def _heads_first(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[b, s, h, d] -> [b, h, s, d] in the pair kernel's operand dtype."""
    return t.to(dtype).transpose(1, 2)


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """Partial outputs merge, and gradients accumulate, in at least fp32."""
    return cp_pairs.upcast_dtype(dtype)


def _repeat_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.repeat_interleave(heads // t.shape[1], dim=1) if t.shape[1] != heads else t


def _sum_heads(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Gradient of _repeat_heads: [b, h, s, d] -> [b, kv_heads, s, d]."""
    b, h, s, d = t.shape
    return t.view(b, kv_heads, h // kv_heads, s, d).sum(2) if h != kv_heads else t


def pair_forward(q, k, v, scale: float, offset: int, window: Optional[int] = None,
                 kernel: str = "auto"):
    """(out, lse) of queries q [b, h, l, d] over keys k, v [b, h, l, d] ``offset`` positions
    before them (0: the same chunk), within ``window``."""
    return cp_pairs.resolve(kernel, q, v).forward(q, k, v, scale, offset, window)


def pair_backward(do, q, k, v, out, lse, scale: float, offset: int, window: Optional[int] = None,
                  kernel: str = "auto"):
    """(dq, dk, dv) of one chunk pair; ``out`` and ``lse`` are the merged (global) ones."""
    return cp_pairs.resolve(kernel, q, v).backward(do, q, k, v, out, lse, scale, offset, window)


def _merge(acc, out, lse):
    """Combine two partial attentions over disjoint key sets by their log-sum-exp (a row that
    has seen no key yet carries lse = -inf and weighs nothing)."""
    out = out.to(_accumulator(out.dtype))
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


def _pair_forward(kernel, allowed, q, k, v, scale: float, offset: int, window: Optional[int]):
    """A pair with a document mask runs the explicit scores (at least fp32): no pair kernel
    takes a per-batch mask."""
    if allowed is None:
        return kernel.forward(q, k, v, scale, offset, window)
    return cp_pairs.math_forward(*cp_pairs.upcast_all(q, k, v), scale, offset, window, allowed)


def _pair_backward(kernel, allowed, do, q, k, v, out, lse, scale: float, offset: int,
                   window: Optional[int]):
    if allowed is None:
        return kernel.backward(do, q, k, v, out, lse, scale, offset, window)
    return cp_pairs.math_backward(*cp_pairs.upcast_all(do, q, k, v, out), lse, scale, offset,
                                  window, allowed)


def ring_forward(q, k, v, scale: float, exchange, window: Optional[int] = None,
                 kernel: str = "auto", documents=None):
    """(out [b, s, hq, d] in q's dtype, lse [b, hq, s] fp32) of this rank's queries; ``exchange``
    (cp_ops.PeerExchange) knows the CP size and this rank; ``kernel`` names the pair kernel.
    ``documents`` [b, s]: this rank's document keys (packed documents), sent along with K/V."""
    size, rank, chunk = exchange.size, exchange.rank, q.shape[1] // 2
    kernel = cp_pairs.resolve(kernel, q, v)
    dtype = kernel.operand_dtype(q.dtype)
    qh = _heads_first(q, dtype).chunk(2, dim=2)
    heads = q.shape[2]
    acc = [None, None]
    own = [k, v] if documents is None else [k, v, documents]
    for step, block in _blocks_by_step(exchange, _steps(exchange, q, window), own):
        src = (rank - step) % size
        kh = _repeat_heads(_heads_first(block[0], dtype), heads).chunk(2, dim=2)
        vh = _repeat_heads(_heads_first(block[1], dtype), heads).chunk(2, dim=2)
        for qi, ki, offset in chunk_pairs(size, rank, src, chunk, window):
            part = _pair_forward(kernel, _allowed(documents, block, qi, ki), qh[qi], kh[ki],
                                 vh[ki], scale, offset, window)
            acc[qi] = _merge(acc[qi], *part)
    out = torch.cat([a[0] for a in acc], dim=2).transpose(1, 2).to(q.dtype)
    return out.contiguous(), torch.cat([a[1] for a in acc], dim=2).contiguous()


def ring_backward(dout, q, k, v, out, lse, scale: float, exchange, window: Optional[int] = None,
                  kernel: str = "auto", documents=None):
    size, rank, chunk = exchange.size, exchange.rank, q.shape[1] // 2
    kernel = cp_pairs.resolve(kernel, q, v)
    dtype = kernel.operand_dtype(q.dtype)
    acc = _accumulator(dtype)
    heads, kv_heads = q.shape[2], k.shape[2]
    qh, do = _heads_first(q, dtype).chunk(2, dim=2), _heads_first(dout, dtype).chunk(2, dim=2)
    lse_c, out_c = lse.chunk(2, dim=2), _heads_first(out, dtype).chunk(2, dim=2)
    dq = [torch.zeros_like(t, dtype=acc) for t in qh]
    dk_own, dv_own = torch.zeros_like(_heads_first(k, acc)), torch.zeros_like(_heads_first(v, acc))
    own = [k, v] if documents is None else [k, v, documents]
    for step, block in _blocks_by_step(exchange, _steps(exchange, q, window), own):
        src = (rank - step) % size
        kh = _repeat_heads(_heads_first(block[0], dtype), heads).chunk(2, dim=2)
        vh = _repeat_heads(_heads_first(block[1], dtype), heads).chunk(2, dim=2)
        dk = [torch.zeros_like(t, dtype=acc) for t in kh]
        dv = [torch.zeros_like(t, dtype=acc) for t in vh]
        for qi, ki, offset in chunk_pairs(size, rank, src, chunk, window):
            g = _pair_backward(kernel, _allowed(documents, block, qi, ki), do[qi], qh[qi], kh[ki],
                               vh[ki], out_c[qi], lse_c[qi], scale, offset, window)
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
                      size: int, rank: int, window: Optional[int],
                      kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    return ring_forward(q, k, v, scale, PeerExchange(axis, size, rank), window, kernel)


@ring_attention_op.register_fake
def _(q, k, v, scale, axis, size, rank, window, kernel):
    b, s, h, _ = q.shape  # out has v's head width (multi-head latent attention: narrower than q's)
    return (q.new_empty((b, s, h, v.shape[-1])),
            q.new_empty((b, h, s), dtype=torch.promote_types(q.dtype, torch.float32)))


@torch.library.custom_op("plait::ring_attention_backward", mutates_args=())
def ring_attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                               v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float,
                               axis: str, size: int, rank: int, window: Optional[int], kernel: str
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ring_backward(dout, q, k, v, out, lse, scale, PeerExchange(axis, size, rank), window,
                         kernel)


@ring_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, scale, axis, size, rank, window, kernel):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, *ctx.args = inputs
    ctx.save_for_backward(q, k, v, *output)


def _backward(ctx, dout, dlse):  # lse is an internal output: it carries no gradient
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.plait.ring_attention_backward(dout, q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


ring_attention_op.register_autograd(_backward, setup_context=_setup)


# ---- what lowered graphs call ------------------------------------------------------------------
def ring_attention(q, k, v, scale: float, axis: str, size: int, rank: int,
                   window: Optional[int] = None) -> torch.Tensor:
    """Drop-in for causal_attention on zigzag-sharded q, k, v [b, s/cp, h, d]; the chunk pairs run
    the default kernels ("auto", cp_pairs.py)."""
    return torch.ops.plait.ring_attention(q, k, v, scale, axis, size, rank, window, "auto")[0]


def ring_attention_with(kernel: str) -> Callable:
    """ring_attention whose chunk pairs run ``kernel`` (cp_pairs.KERNELS): what kernels.bind binds."""
    cp_pairs.KERNELS[kernel]  # noqa: B018  (an unknown name fails here, not mid-training)

    def ring_attention(q, k, v, scale: float, axis: str, size: int, rank: int,
                       window: Optional[int] = None) -> torch.Tensor:
        return torch.ops.plait.ring_attention(q, k, v, scale, axis, size, rank, window, kernel)[0]
    ring_attention.pair_kernel = kernel
    return ring_attention


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
