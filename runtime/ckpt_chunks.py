"""Where a rank's tensor lies inside the global tensor: rectangular chunks with offsets.

A checkpoint stores every tensor in its global (reference-model) shape as a set of chunks, each
with its offset in the global tensor -- the form DCP gives DTensors, here for every sharding plait
uses: TP pieces (`ShardSpec.slices`, segmented splits give several chunks), expert shards
(`ExpertSync.slices`), FSDP's shards of those (along one dim, counts.fsdp_shard_dim), whole
replicas. A rank writes the chunks it
holds and reads back, under any other layout, the parts of the saved chunks that overlap its own.

An index is what `ShardSpec.slices` returns: per dimension a slice or a list of slices (pieces of
the global dimension concatenated in the local one).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

Run = tuple[int, int, int]  # (local start, global start, length) along one dimension


@dataclass(frozen=True)
class Chunk:
    offset: tuple[int, ...]  # in the global tensor
    size: tuple[int, ...]
    local: tuple[int, ...]  # where it starts in the rank's tensor

    def global_index(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.size))

    def local_index(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + n) for o, n in zip(self.local, self.size))


def _runs(entry, full: int) -> list[Run]:
    """The pieces of one dimension: a slice, or a list of slices concatenated locally."""
    runs, local = [], 0
    for s in entry if isinstance(entry, list) else [entry]:
        start, stop, step = s.indices(full)
        if step != 1:
            raise ValueError(f"strided index {s} cannot be a checkpoint chunk")
        runs.append((local, start, stop - start))
        local += stop - start
    return runs


def _restrict(runs: list[Run], lo: int, hi: int) -> list[Run]:
    """The part of ``runs`` at local positions [lo, hi), renumbered from lo (FSDP's shard of one
    dim of an already TP-local tensor)."""
    out = []
    for local, glob, n in runs:
        a, b = max(local, lo), min(local + n, hi)
        if a < b:
            out.append((a - lo, glob + (a - local), b - a))
    return out


def chunks(full: Sequence[int], index: Optional[tuple] = None,
           span: Optional[tuple[int, int, int]] = None) -> list[Chunk]:
    """The chunks of a rank's tensor that is ``global[index]`` (whole when None), optionally only
    its positions [lo, hi) along one dim, ``span`` = (dim, lo, hi) (FSDP)."""
    full = tuple(full)
    index = tuple(index or ()) + (slice(None),) * (len(full) - len(index or ()))
    per_dim = [_runs(e, n) for e, n in zip(index, full)]
    if span is not None and full:
        dim, lo, hi = span
        per_dim[dim] = _restrict(per_dim[dim], lo, hi)
    out = []
    for combo in itertools.product(*per_dim):
        size = tuple(r[2] for r in combo)
        if all(n > 0 for n in size):
            out.append(Chunk(offset=tuple(r[1] for r in combo), size=size,
                             local=tuple(r[0] for r in combo)))
    return out


def local_span(t: torch.Tensor) -> Optional[tuple[int, int, int]]:
    """For a DTensor sharded along one dim (FSDP2), (dim, lo, hi): the positions [lo, hi) of that
    dim this rank holds; None for a plain tensor (all of it)."""
    if not hasattr(t, "to_local"):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if not shape:
        return None
    (placement,) = t.placements
    dim = placement.dim if placement.is_shard() else 0
    return dim, offset[dim], offset[dim] + shape[dim]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def overlap(a: Chunk, offset: Sequence[int], size: Sequence[int]):
    """The global box shared by chunk ``a`` and the box (offset, size); None when empty."""
    lo = [max(x, y) for x, y in zip(a.offset, offset)]
    hi = [min(x + n, y + m) for x, n, y, m in zip(a.offset, a.size, offset, size)]
    if any(l >= h for l, h in zip(lo, hi)):
        return None
    return lo, hi
