"""Context parallelism: the zigzag sequence layout and the CP collectives lowered graphs call.

Zigzag load balance (Megatron-Core, Llama 3): the sequence is cut into 2*cp equal chunks and CP
rank i holds chunks i and 2*cp-1-i, so every rank gets one early (cheap) and one late (expensive)
chunk of the causal attention triangle. Everything sequence-dependent in a compiled program reads
its positions through these helpers: the token and label slices, RoPE positions, the ring
attention's chunk-pair masks, Mamba's conv halo and scan-state hand-off.

CP collectives are `plait::` custom ops (traceable, with fake kernels for shape propagation and
registered autograd), bound to the mesh axis "cp" like the TP ops in collectives.py:

  all_to_all  forward: scatter ``scatter_dim`` / gather ``gather_dim`` over the group;
              backward: the same with the two dims swapped (Ulysses)
  PeerExchange  send to the CP rank t ahead, receive from the one t behind (no autograd: the ring
                attention op runs its own backward ring, see cp_attention.py)
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from . import collectives as cc

CP_AXIS = "cp"


# ---- the zigzag layout -------------------------------------------------------------------------
def zigzag_chunks(size: int, rank: int) -> tuple[int, int]:
    """Global chunk ids (of 2*size) that CP rank ``rank`` holds, in local order."""
    return rank, 2 * size - 1 - rank


def zigzag_order(size: int) -> list[int]:
    """Global chunk ids in the order a rank-ordered gather of all local sequences lays them."""
    return [c for r in range(size) for c in zigzag_chunks(size, r)]


def zigzag_shard(x: torch.Tensor, size: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's two chunks of the full sequence along ``dim`` (tokens, labels)."""
    chunks = x.chunk(2 * size, dim)
    first, second = zigzag_chunks(size, rank)
    return torch.cat((chunks[first], chunks[second]), dim)


def zigzag_unshard(pieces: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """The full sequence from every rank's local sequence (rank order): inverse of zigzag_shard."""
    size = len(pieces)
    halves = [h for p in pieces for h in p.chunk(2, dim)]
    order = zigzag_order(size)
    return torch.cat([halves[order.index(c)] for c in range(2 * size)], dim)


def zigzag_positions(x: torch.Tensor, size: int, rank: int) -> torch.Tensor:
    """Global positions of the local tokens along dim 1 of ``x`` (replaces sequence_positions)."""
    chunk = x.shape[1] // 2
    first, second = zigzag_chunks(size, rank)
    return torch.cat((torch.arange(first * chunk, (first + 1) * chunk, device=x.device),
                      torch.arange(second * chunk, (second + 1) * chunk, device=x.device)))


def natural_from_gathered(size: int, chunk: int, device=None) -> torch.Tensor:
    """Index that reorders a rank-ordered gathered sequence (zigzag order) into natural order."""
    order = zigzag_order(size)
    starts = [order.index(c) * chunk for c in range(2 * size)]
    return torch.cat([torch.arange(s, s + chunk, device=device) for s in starts])


# ---- all_to_all with autograd ------------------------------------------------------------------
def _all_to_all(x: torch.Tensor, axis: str, size: int, scatter_dim: int, gather_dim: int):
    pieces = x.movedim(scatter_dim, 0).contiguous()
    with cc.guard("all_to_all", axis):
        out = funcol.all_to_all_single(pieces, None, None, cc.axis_group(axis))
        out = funcol.wait_tensor(out) if isinstance(out, funcol.AsyncCollectiveTensor) else out
    # out: [size * n/size, ...] with rank j's piece j-th along dim 0 (scatter dim in front)
    out = out.movedim(0, scatter_dim)
    return torch.cat(out.chunk(size, scatter_dim), gather_dim)


def _a2a_shape(x: torch.Tensor, size: int, scatter_dim: int, gather_dim: int) -> list[int]:
    shape = list(x.shape)
    shape[scatter_dim] //= size
    shape[gather_dim] *= size
    return shape


@torch.library.custom_op("plait::all_to_all", mutates_args=())
def all_to_all(x: torch.Tensor, axis: str, size: int, scatter_dim: int,
               gather_dim: int) -> torch.Tensor:
    return _all_to_all(x, axis, size, scatter_dim, gather_dim)


@all_to_all.register_fake
def _(x, axis, size, scatter_dim, gather_dim):
    return x.new_empty(_a2a_shape(x, size, scatter_dim, gather_dim))


def _a2a_setup(ctx, inputs, output):
    ctx.axis, ctx.size, ctx.scatter_dim, ctx.gather_dim = inputs[1:]


def _a2a_backward(ctx, grad):
    back = torch.ops.plait.all_to_all(grad, ctx.axis, ctx.size, ctx.gather_dim, ctx.scatter_dim)
    return back, None, None, None, None


all_to_all.register_autograd(_a2a_backward, setup_context=_a2a_setup)


# ---- ring point-to-point -----------------------------------------------------------------------
class PeerExchange:
    """Send tensors to the CP rank ``distance`` ahead on the ring while receiving those of the rank
    ``distance`` behind (a negative distance sends backwards), started asynchronously so the
    caller can compute on the current block meanwhile. The group is looked up at the first send:
    a one-rank "ring" never sends."""

    def __init__(self, axis: str, size: int, rank: int):
        self.axis, self.size, self.rank = axis, size, rank

    def _peer(self, offset: int) -> int:
        group = cc.axis_group(self.axis)
        return dist.get_global_rank(group, (self.rank + offset) % self.size)

    def start(self, distance: int, tensors: list[torch.Tensor]):
        group = cc.axis_group(self.axis)
        to, source = self._peer(distance), self._peer(-distance)
        tensors = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, to, group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, source, group) for r in received]
        with cc.guard("ring send/recv", self.axis):
            works = dist.batch_isend_irecv(ops)
        return works, received

    def wait(self, pending) -> list[torch.Tensor]:
        works, received = pending
        with cc.guard("ring send/recv", self.axis):
            for w in works:
                w.wait()
        return received
