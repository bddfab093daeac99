"""The sharding plans block kinds state as data (their ``parallelize`` facet, plait/kinds/<kind>/)
and the generic passes apply: shard_tensor_parallel reads a TensorParallelPlan per kind,
context_parallel the SequenceOps. A pass never names a kind; a kind never edits a graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from torch import nn

# shard(relative parameter path, dim): replace a mixer parameter by this rank's contiguous slice
# along dim (an absent optional parameter, a bias = None, is skipped)
ShardParam = Callable[[str, int], None]


@dataclass(frozen=True)
class ParamSplit:
    """Parameter ``name`` of a mixer (relative path) split along ``dim``; ``segments`` are the
    logical sizes of the components each chunked on its own (empty: one plain chunk)."""

    name: str
    dim: int
    segments: tuple[int, ...] = ()


@dataclass(frozen=True)
class TensorParallelPlan:
    """How TP splits the mixer of one kind, by the C4 leaf module names inside it.

    column     linears split by output features (weight rows and bias): their output is sharded
    row        linears split by input features: their partial output is reduced over TP, the
               bias added after the reduction (the mixer's exit)
    split_on   leaf -> mixer parameters sharded (segmented, `ParamSplit`) when that leaf is
               called; the leaf then acts as a column-parallel linear (Mamba's in_proj)
    whole      a mixer called as one module (placed by an earlier pass, the expert-parallel MoE):
               ``whole(mixer, path, shard, (axis, tp))`` shards what TP splits inside it
    """

    column: tuple[str, ...] = ()
    row: tuple[str, ...] = ()
    split_on: Mapping[str, tuple[ParamSplit, ...]] = field(default_factory=dict)
    whole: Optional[Callable[[nn.Module, str, ShardParam, tuple[str, int]], None]] = None


@dataclass(frozen=True)
class SequenceOp:
    """A reference op that reads along the whole sequence (kept one fx node for this reason) and
    its context-parallel replacement per ``cp_comm``. ``communicates``: the replacement is called
    ``(*args, axis, cp, rank)`` and exchanges chunks; else ``(args[0], cp, rank)`` (positions)."""

    op: Callable
    replacement: Mapping[str, Callable]
    communicates: bool = True
