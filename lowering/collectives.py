"""The collectives a lowered graph may call: a closed vocabulary of `plait::` custom ops.

Each op names a *logical mesh axis* ("tp", ...) and the axis size, not a process group, so a
compiled program is plain readable code (`torch.ops.plait.gather_seq(x, 'tp', 2, 1)`) and its shapes
can be checked without processes (the fake kernels use the size). The runtime binds each axis to
this rank's torch.distributed group (`bind_axis`). Inside, every op calls torch.distributed's
collectives (out of place: the custom op's result is a new tensor); custom ops keep the graphs
traceable by torch.fx and make_fx, and registered autograd gives Megatron's conjugate pairs:

  copy_to_tp      forward identity        backward all-reduce      (Megatron's f)
  reduce_from_tp  forward all-reduce      backward identity        (Megatron's g)
  gather_seq      forward all-gather(dim) backward reduce-scatter  (sequence parallel)
  scatter_seq     forward reduce-scatter  backward all-gather
  max_over        forward all-reduce max  no gradient (callers pass detached tensors)

torch's own autograd for all_reduce is all-reduce in both directions (the adjoint when every rank's
loss is summed), which is not what a replicated TP loss needs; hence the pairs are spelled out here.
Every call runs inside `guard(op, axis)`, so a timeout names its group and operation.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Optional

import torch
import torch.distributed as dist

_AXES: dict[str, dist.ProcessGroup] = {}
_AXIS_RANKS: dict[str, tuple[int, ...]] = {}
# Where this rank is: guarded calls entered per axis, and the one it is inside (op, axis, number).
# Peers of a group enter the same calls in the same order, so on a timeout the runtime
# (runtime.stall) compares counts to name the members that never arrived.
_CALLS: dict[str, int] = {}
_INSIDE: list = [None]
_TIMEOUT_NOTE: list[Optional[Callable[[str, str, int, tuple[int, ...]], str]]] = [None]
# Seconds spent inside guarded calls while a `seconds_inside` block is open (None: not counted)
_SPENT: list[Optional[float]] = [None]


class CollectiveTimeout(RuntimeError):
    """A collective that did not complete in its group's timeout; says which op on which group."""


def bind_axis(axis: str, group: dist.ProcessGroup, ranks: tuple[int, ...]) -> None:
    _AXES[axis] = group
    _AXIS_RANKS[axis] = tuple(ranks)


def unbind_all() -> None:
    _AXES.clear()
    _AXIS_RANKS.clear()
    _CALLS.clear()


def position() -> dict:
    """Guarded calls entered per axis, and the one in progress (None between collectives)."""
    return {"calls": dict(_CALLS), "inside": _INSIDE[0]}


def on_timeout(note: Optional[Callable[[str, str, int, tuple[int, ...]], str]]) -> None:
    """``note(op, axis, call_number, members)``: text added to a CollectiveTimeout (who is missing)."""
    _TIMEOUT_NOTE[0] = note


@contextmanager
def seconds_inside():
    """Count the wall seconds this rank spends inside guarded collectives (waiting for its peers
    included) while the block runs; yields a one-item list that holds them at the end.
    `plait calibrate` separates the host work of a context-parallel op from its exchanges with
    it (runtime/calibrate_cp.py)."""
    outer, _SPENT[0] = _SPENT[0], 0.0
    total = [0.0]
    try:
        yield total
    finally:
        total[0] = _SPENT[0]
        _SPENT[0] = None if outer is None else outer + total[0]


def axis_group(axis: str) -> dist.ProcessGroup:
    if axis not in _AXES:
        raise RuntimeError(f"mesh axis {axis!r} is not bound to a process group on this rank "
                           f"(bound: {sorted(_AXES)}); the runtime must call bind_axis first")
    return _AXES[axis]


def describe(axis: str) -> str:
    return f"{axis} group {list(_AXIS_RANKS.get(axis, ()))}"


def _is_timeout(err: BaseException) -> bool:
    text = str(err).lower()
    return "timed out" in text or "timeout" in text


@contextmanager
def guard(op: str, axis: str):
    """Re-raise a timeout inside a collective as CollectiveTimeout naming the op, the group and
    (when the runtime can tell) the members that did not arrive."""
    number = _CALLS[axis] = _CALLS.get(axis, 0) + 1
    outer, _INSIDE[0] = _INSIDE[0], (op, axis, number)
    start = time.perf_counter() if _SPENT[0] is not None and outer is None else None
    try:
        yield
    except CollectiveTimeout:
        raise
    except RuntimeError as err:
        if not _is_timeout(err):
            raise
        note = _TIMEOUT_NOTE[0]
        missing = note(op, axis, number, _AXIS_RANKS.get(axis, ())) if note else ""
        raise CollectiveTimeout(f"{op} on {describe(axis)} timed out{missing}: {err}") from err
    finally:
        _INSIDE[0] = outer
        if start is not None and _SPENT[0] is not None:
            _SPENT[0] += time.perf_counter() - start


# ---- plain guarded collectives (no autograd): the runtime's gradient and optimizer traffic ----
# Called on torch.distributed's c10d API directly: the functional collectives wrap every result in an
# AsyncCollectiveTensor and dispatch through Python, ~0.4 ms of CPU per call that these calls (each
# waited for at once) do not need. Each returns a new tensor and leaves its input as it was.
REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN,
              "avg": dist.ReduceOp.AVG, "product": dist.ReduceOp.PRODUCT}


def _all_reduce(x: torch.Tensor, op: str, group: dist.ProcessGroup) -> torch.Tensor:
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, REDUCE_OPS[op], group=group)
    return out


def all_reduce(x: torch.Tensor, op: str, axis: str) -> torch.Tensor:
    with guard(f"all_reduce({op})", axis):
        return _all_reduce(x, op, axis_group(axis))


def all_gather(x: torch.Tensor, dim: int, axis: str) -> torch.Tensor:
    with guard("all_gather", axis):
        group = axis_group(axis)
        parts = dist.get_world_size(group)
        x = x.contiguous()
        out = x.new_empty((parts * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x, group=group)
        return torch.cat(out.chunk(parts), dim) if dim != 0 else out


def reduce_scatter(x: torch.Tensor, dim: int, axis: str) -> torch.Tensor:
    with guard("reduce_scatter", axis):
        group = axis_group(axis)
        parts, me = dist.get_world_size(group), dist.get_rank(group)
        if dist.get_backend(group) == "gloo":
            # gloo reduce-scatters by all-reducing the whole buffer and copying out a slice (with
            # coalescing copies around it): the same sums, taken here at a third of the cost
            return _all_reduce(x, "sum", group).chunk(parts, dim)[me].contiguous()
        moved = x.movedim(dim, 0).contiguous()
        out = moved.new_empty((moved.shape[0] // parts, *moved.shape[1:]))
        dist.reduce_scatter_tensor(out, moved, group=group)
        return out.movedim(0, dim).contiguous()


def _resized(x: torch.Tensor, dim: int, factor: float) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = int(shape[dim] * factor)
    return x.new_empty(shape)


# ---- copy_to_tp: identity forward, all-reduce backward -------------------------------------
@torch.library.custom_op("plait::copy_to_tp", mutates_args=())
def copy_to_tp(x: torch.Tensor, axis: str, size: int) -> torch.Tensor:
    return x.clone()


@copy_to_tp.register_fake
def _(x, axis, size):
    return torch.empty_like(x)


def _copy_to_tp_backward(ctx, grad):
    return torch.ops.plait.reduce_from_tp(grad, ctx.axis, ctx.size), None, None


# ---- reduce_from_tp: all-reduce forward, identity backward ---------------------------------
@torch.library.custom_op("plait::reduce_from_tp", mutates_args=())
def reduce_from_tp(x: torch.Tensor, axis: str, size: int) -> torch.Tensor:
    return all_reduce(x, "sum", axis)


@reduce_from_tp.register_fake
def _(x, axis, size):
    return torch.empty_like(x)


def _reduce_from_tp_backward(ctx, grad):
    return torch.ops.plait.copy_to_tp(grad, ctx.axis, ctx.size), None, None


# ---- gather_seq / scatter_seq: sequence parallel along `dim` -------------------------------
@torch.library.custom_op("plait::gather_seq", mutates_args=())
def gather_seq(x: torch.Tensor, axis: str, size: int, dim: int) -> torch.Tensor:
    return all_gather(x, dim, axis)


@gather_seq.register_fake
def _(x, axis, size, dim):
    return _resized(x, dim, size)


@torch.library.custom_op("plait::scatter_seq", mutates_args=())
def scatter_seq(x: torch.Tensor, axis: str, size: int, dim: int) -> torch.Tensor:
    return reduce_scatter(x, dim, axis)


@scatter_seq.register_fake
def _(x, axis, size, dim):
    return _resized(x, dim, 1 / size)


def _gather_seq_backward(ctx, grad):
    return torch.ops.plait.scatter_seq(grad, ctx.axis, ctx.size, ctx.dim), None, None, None


def _scatter_seq_backward(ctx, grad):
    return torch.ops.plait.gather_seq(grad, ctx.axis, ctx.size, ctx.dim), None, None, None


# ---- max_over: no gradient -----------------------------------------------------------------
@torch.library.custom_op("plait::max_over", mutates_args=())
def max_over(x: torch.Tensor, axis: str, size: int) -> torch.Tensor:
    return all_reduce(x, "max", axis)


@max_over.register_fake
def _(x, axis, size):
    return torch.empty_like(x)


def _save_axis(ctx, inputs, output):
    ctx.axis, ctx.size = inputs[1], inputs[2]
    ctx.dim = inputs[3] if len(inputs) > 3 else None


copy_to_tp.register_autograd(_copy_to_tp_backward, setup_context=_save_axis)
reduce_from_tp.register_autograd(_reduce_from_tp_backward, setup_context=_save_axis)
gather_seq.register_autograd(_gather_seq_backward, setup_context=_save_axis)
scatter_seq.register_autograd(_scatter_seq_backward, setup_context=_save_axis)

# The closed vocabulary, for verifiers and printers.
COLLECTIVE_OPS = {
    torch.ops.plait.copy_to_tp.default: "copy_to_tp",
    torch.ops.plait.reduce_from_tp.default: "reduce_from_tp",
    torch.ops.plait.gather_seq.default: "gather_seq",
    torch.ops.plait.scatter_seq.default: "scatter_seq",
    torch.ops.plait.max_over.default: "max_over",
}
