"""How tensor parallelism splits a Mamba2 mixer (Megatron-Core's MambaMixer layout).

in_proj's output is the concatenation [z | x | B | C | dt]; a contiguous chunk of it would hand a
rank parts of the wrong components, so each component is chunked on its own and the rank's pieces
are concatenated again (a *segmented* split). Likewise the conv channels [x | B | C]. The per-head
vectors (dt_bias, A_log, D) and the gated-norm weight (whose group size d_inner / groups stays the
same on every rank because groups divide by tp) are plain contiguous chunks; out_proj is
row-parallel. After the split the mixer's forward reads its local sizes from the parameters
(see lowering/modules/mamba.py), so the graph needs no other rewrite.

This module only states the splits as data; shard_tensor_parallel applies them.
"""
from __future__ import annotations

from dataclasses import dataclass

from plait.ir.model import ModelSpec


@dataclass(frozen=True)
class ParamSplit:
    """Parameter ``name`` of a mixer (relative path) split along ``dim``; ``segments`` are the
    logical sizes of the components each chunked on its own (empty: one plain chunk)."""

    name: str
    dim: int
    segments: tuple[int, ...] = ()


def mamba_splits(spec: ModelSpec) -> tuple[ParamSplit, ...]:
    """The column-parallel side of a Mamba2 mixer (out_proj is handled as a row-parallel linear)."""
    m = spec.mamba
    bc = m.groups * m.state
    in_proj = (m.d_inner, m.d_inner, bc, bc, m.heads)
    conv = (m.d_inner, bc, bc)
    return (
        ParamSplit("in_proj.weight", 0, in_proj), ParamSplit("in_proj.bias", 0, in_proj),
        ParamSplit("conv1d.weight", 0, conv), ParamSplit("conv1d.bias", 0, conv),
        ParamSplit("dt_bias", 0), ParamSplit("A_log", 0), ParamSplit("D", 0),
        ParamSplit("norm.weight", 0),
    )
