"""The collectives of token dispatch: uneven (``-v``) all-to-all, all-gather and reduce-scatter
over a logical mesh axis ("ep", "etp", "etp-ep"), each an autograd Function whose backward is its
conjugate collective:

  all_to_all_v      forward rows -> peers by ``in_splits``   backward the reverse all-to-all
  all_gather_v      forward every peer's rows, concatenated  backward reduce-scatter-v
  reduce_scatter_v  forward sum of partial rows, my chunk    backward all-gather-v
  all_gather        (even, dim 0)                            backward reduce-scatter
  reduce_scatter    (even, dim 0)                            backward all-gather

Inside, each is a torch.distributed functional collective (``all_to_all_single``,
``all_gather_tensor``, ``reduce_scatter_tensor``); uneven all-gather / reduce-scatter are spelled as
all-to-alls because gloo has no uneven all-gather. Axes resolve to process groups through
`plait.lowering.collectives` (bound by the runtime), and every call runs under its timeout guard.

Every call also reports the bytes this rank sends to *other* ranks to the active `CommCounter`
(forward and backward alike): the MoE communication-truth benchmark reads them.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from plait.lowering import collectives as cc


@dataclass
class CommCounter:
    """Bytes sent to / received from other ranks, per (operation, axis)."""

    sent: dict[tuple[str, str], int] = field(default_factory=dict)
    received: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, op: str, axis: str, sent: int, received: int) -> None:
        self.sent[(op, axis)] = self.sent.get((op, axis), 0) + int(sent)
        self.received[(op, axis)] = self.received.get((op, axis), 0) + int(received)

    def total(self, ops: tuple[str, ...] | None = None, received: bool = False) -> int:
        table = self.received if received else self.sent
        return sum(b for (op, _), b in table.items() if ops is None or op in ops)


_COUNTERS: list[CommCounter] = []
# Operation names the counters use: token rows (hidden states and their gradients) ...
TOKEN_OPS = ("all_to_all", "all_gather_v", "reduce_scatter_v", "all_gather", "reduce_scatter")
# ... and routing metadata (per-expert counts, gathered choices and weights, aux-loss counts).
META_OPS = ("count_exchange", "routing_exchange")


@contextmanager
def counting():
    """``with counting() as c: ...`` -- c.sent holds the bytes the calls inside sent."""
    counter = CommCounter()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def _count(op: str, axis: str, sent: int, received: int | None = None) -> None:
    """Ring all-gathers and reduce-scatters receive what they send; all-to-alls need not."""
    for counter in _COUNTERS:
        counter.add(op, axis, sent, sent if received is None else received)


def axis_size(axis: str) -> int:
    return dist.get_world_size(cc.axis_group(axis))


def axis_rank(axis: str) -> int:
    return dist.get_rank(cc.axis_group(axis))


def _wait(t):
    return funcol.wait_tensor(t) if isinstance(t, funcol.AsyncCollectiveTensor) else t


def _row_bytes(x: torch.Tensor) -> int:
    return math.prod(x.shape[1:]) * x.element_size()


def _a2a(x: torch.Tensor, out_splits: list[int], in_splits: list[int], axis: str, op: str):
    me, row = axis_rank(axis), _row_bytes(x)
    _count(op, axis, (sum(in_splits) - in_splits[me]) * row, (sum(out_splits) - out_splits[me]) * row)
    with cc.guard(op, axis):
        return _wait(funcol.all_to_all_single(x.contiguous(), out_splits, in_splits,
                                              cc.axis_group(axis)))


class _AllToAllV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, axis, op):
        ctx.splits, ctx.axis, ctx.op = (out_splits, in_splits), axis, op
        return _a2a(x, out_splits, in_splits, axis, op)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _a2a(grad, in_splits, out_splits, ctx.axis, ctx.op), None, None, None, None


def all_to_all_v(x: torch.Tensor, out_splits: list[int], in_splits: list[int], axis: str,
                 op: str = "all_to_all") -> torch.Tensor:
    """Rows [sum(in_splits), ...] -> rows [sum(out_splits), ...]: chunk j goes to peer j."""
    return _AllToAllV.apply(x, list(out_splits), list(in_splits), axis, op)


def all_gather_v(x: torch.Tensor, sizes: list[int], axis: str) -> torch.Tensor:
    """Concatenate every peer's rows (peer j holds ``sizes[j]`` rows), in group order. Spelled
    as an all-to-all of this rank's rows to every peer: the same bytes as an all-gather."""
    n = len(sizes)
    return all_to_all_v(x.repeat(n, *([1] * (x.dim() - 1))), sizes, [x.shape[0]] * n, axis,
                        op="all_gather_v")


def reduce_scatter_v(x: torch.Tensor, sizes: list[int], axis: str) -> torch.Tensor:
    """Partial rows [sum(sizes), ...] summed over the group; this rank keeps its ``sizes[me]``."""
    n, me = len(sizes), axis_rank(axis)
    y = all_to_all_v(x, [sizes[me]] * n, sizes, axis, op="reduce_scatter_v")
    return y.view(n, sizes[me], *x.shape[1:]).sum(0)


def _gather(x: torch.Tensor, axis: str, op: str = "all_gather") -> torch.Tensor:
    _count(op, axis, x.numel() * x.element_size() * (axis_size(axis) - 1))
    with cc.guard(op, axis):
        return _wait(funcol.all_gather_single(x.contiguous(), 0, cc.axis_group(axis)))


def _scatter(x: torch.Tensor, axis: str, op: str = "reduce_scatter") -> torch.Tensor:
    n = axis_size(axis)
    _count(op, axis, x.numel() * x.element_size() * (n - 1) // n)
    with cc.guard(op, axis):
        return _wait(funcol.reduce_scatter_single(x.contiguous(), "sum", 0, cc.axis_group(axis)))


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis, op):
        ctx.axis, ctx.op = axis, op
        return _gather(x, axis, op)

    @staticmethod
    def backward(ctx, grad):
        return _scatter(grad, ctx.axis, ctx.op), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis):
        ctx.axis = axis
        return _scatter(x, axis)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.axis), None


def all_gather(x: torch.Tensor, axis: str, op: str = "all_gather") -> torch.Tensor:
    """Even all-gather along dim 0 (backward: reduce-scatter of the gradient). ``op`` names it
    for the byte counters (token rows vs routing metadata)."""
    return _AllGather.apply(x, axis, op)


def reduce_scatter(x: torch.Tensor, axis: str) -> torch.Tensor:
    """Even reduce-scatter (sum) along dim 0 (backward: all-gather of the gradient)."""
    return _ReduceScatter.apply(x, axis)


def all_gather_counts(counts: torch.Tensor, axis: str) -> torch.Tensor:
    """Small integer metadata (no gradient): [n, *counts.shape] of every peer's counts."""
    return _gather(counts.unsqueeze(0), axis, op="count_exchange").view(-1, *counts.shape)


def exchange_counts(counts: torch.Tensor, axis: str) -> torch.Tensor:
    """counts [n, E_local] (rows for each peer) -> [n, E_local] (rows each peer sent me)."""
    n = counts.shape[0]
    return _a2a(counts.contiguous(), [1] * n, [1] * n, axis, op="count_exchange")


def all_reduce_sum(x: torch.Tensor, axis: str) -> torch.Tensor:
    """No-gradient sum over the axis (token counts for the aux loss)."""
    n = axis_size(axis)
    _count("count_exchange", axis, 2 * x.numel() * x.element_size() * (n - 1) // n)
    return cc.all_reduce(x, "sum", axis)
