"""Where a Mamba2 mixer's components sit inside its fused tensors (the one statement of it for
this kind's facets): in_proj's output is [z | x | B | C | dt] (d_inner, d_inner, groups x state
twice, heads) and the conv channels are [x | B | C]; inside z and x, head h's channel c is at
h * head_dim + c."""
from __future__ import annotations

from plait.ir.model import Mamba2
from plait.ir.plan import LayerKeep


def in_proj_sizes(m: Mamba2) -> tuple[int, ...]:
    """Logical sizes of in_proj's output components z, x, B, C, dt."""
    bc = m.groups * m.state
    return (m.d_inner, m.d_inner, bc, bc, m.heads)


def conv_sizes(m: Mamba2) -> tuple[int, ...]:
    """Logical sizes of the conv channels x, B, C."""
    bc = m.groups * m.state
    return (m.d_inner, bc, bc)


def mamba_inner(keep: LayerKeep, head_dim: int) -> list[int]:
    """Positions in d_inner of the kept (head, channel) pairs."""
    return [h * head_dim + c for h in keep.units for c in keep.channels]
