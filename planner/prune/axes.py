"""Which block kind owns each prune axis, read from the registry (each kind's dsl facet lists its
PRUNE_AXES, plait/kinds/<kind>/dsl.py): the first axis of a kind narrows its units, a second one
the per-unit channels. ``hidden`` belongs to no kind. The pruning planner asks these tables and the
kind's prune facet (plait/kinds/<kind>/prune.py), never a kind's name."""
from __future__ import annotations

from types import ModuleType
from typing import Optional

from plait.ir import kinds

KIND_AXES: dict[str, tuple[str, ...]] = {k: kinds.facet(k, "dsl").PRUNE_AXES for k in kinds.names()}
AXIS_KIND: dict[str, Optional[str]] = {"hidden": None, **{a: k for k, axes in KIND_AXES.items() for a in axes}}
LAYOUT_DIVISOR: dict[str, str] = {a: mesh for k in kinds.names()
                                  for a, mesh in kinds.facet(k, "prune").layout_divisors().items()}


def prune_facet(kind: str) -> ModuleType:
    return kinds.facet(kind, "prune")


def unit_axis(kind: str) -> str:
    """The axis that narrows a kind's units (ffn neurons, heads, experts)."""
    return KIND_AXES[kind][0]


def channel_axis(kind: str) -> Optional[str]:
    """The axis that narrows the channels of a kind's units (mamba head_dim), if it has one."""
    axes = KIND_AXES[kind]
    return axes[1] if len(axes) > 1 else None


def is_channel_axis(axis: str) -> bool:
    kind = AXIS_KIND[axis]
    return kind is not None and channel_axis(kind) == axis
