"""Document-masked attention over a context-parallel group: the CP forms of `document_attention`.

Packed documents are kept apart by a per-token document key (tokens of one document share it,
see `SelfAttention.forward`). The keys are sharded like the tokens (zigzag, cp_ops.py), so each CP
variant needs the keys of the tokens it attends to:

  ring      the K/V blocks travel the ring with their keys; every chunk pair is masked by
            key equality on top of the causal chunk rule (cp_attention.ring_forward/backward)
  alltoall  q, k, v go from sequence- to head-sharding as in plain Ulysses; the keys are
            all-gathered (every rank needs the whole sequence's), put in natural order, and
            the reference `document_attention` runs over the whole sequence

Both are `plait::` ops (fake kernels for the passes' shape checks), one node per attention layer.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import collectives  # noqa: F401  (registers torch.ops.plait.gather_seq)
from .cp_attention import ring_backward, ring_forward
from .cp_ops import PeerExchange, natural_from_gathered
from .modules.attention import document_attention


@torch.library.custom_op("plait::ring_document_attention", mutates_args=())
def ring_document_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               documents: torch.Tensor, scale: float, axis: str, size: int,
                               rank: int, window: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return ring_forward(q, k, v, scale, PeerExchange(axis, size, rank), window, documents=documents)


@ring_document_attention_op.register_fake
def _(q, k, v, documents, scale, axis, size, rank, window):
    b, s, h, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, s), dtype=torch.promote_types(q.dtype, torch.float32))


@torch.library.custom_op("plait::ring_document_attention_backward", mutates_args=())
def ring_document_attention_backward_op(
        dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        documents: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float, axis: str,
        size: int, rank: int, window: Optional[int]
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ring_backward(dout, q, k, v, out, lse, scale, PeerExchange(axis, size, rank), window,
                         documents=documents)


@ring_document_attention_backward_op.register_fake
def _(dout, q, k, v, documents, out, lse, scale, axis, size, rank, window):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, documents, *ctx.args = inputs
    ctx.save_for_backward(q, k, v, documents, *output)


def _backward(ctx, dout, dlse):  # lse is an internal output; the keys are integers
    q, k, v, documents, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.plait.ring_document_attention_backward(dout, q, k, v, documents, out,
                                                                  lse, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


ring_document_attention_op.register_autograd(_backward, setup_context=_setup)


def ring_document_attention(q, k, v, scale: float, documents, axis: str, size: int, rank: int,
                            window: Optional[int] = None) -> torch.Tensor:
    """Drop-in for document_attention on zigzag-sharded q, k, v [b, s/cp, h, d] and keys [b, s/cp]."""
    return torch.ops.plait.ring_document_attention(q, k, v, documents, scale, axis, size, rank,
                                                   window)[0]


def ulysses_document_attention(q, k, v, scale: float, documents, axis: str, size: int, rank: int,
                               window: Optional[int] = None) -> torch.Tensor:
    """Drop-in for document_attention on zigzag-sharded inputs: all-to-all to head sharding,
    document attention over the natural-order sequence with all-gathered keys, all-to-all back."""
    if k.shape[2] % size:  # too few kv heads to split: give every query head its own
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
    q, k, v = (torch.ops.plait.all_to_all(t, axis, size, 2, 1) for t in (q, k, v))
    natural = natural_from_gathered(size, q.shape[1] // (2 * size), q.device)
    keys = torch.ops.plait.gather_seq(documents, axis, size, 1).index_select(1, natural)
    out = document_attention(*(t.index_select(1, natural) for t in (q, k, v)), scale, keys, window)
    out = out.index_select(1, torch.argsort(natural))
    return torch.ops.plait.all_to_all(out, axis, size, 1, 2)
