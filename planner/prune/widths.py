"""The widths each axis may take: snapped to hardware-friendly multiples, inside the job's bounds,
legal for the block's structure and for every parallel layout the pruned model must still run under.

Multiples: hidden 256, ffn 512, mamba head_dim 8; heads in whole KV groups (attention) or whole
mamba groups; experts one at a time. A small model whose width is under 8 multiples halves the
multiple until it has 8 (tiny-dense's hidden 128 searches multiples of 16). Without bounds an axis
searches [MIN_FRACTION x original, original]. The original width is always a candidate.

Layout rules (planner/layouts.py; each kind's prune facet says which of its axes a parallel size
divides): tp divides attention heads, mamba heads and the mlp ffn; ep divides experts. kv_heads, mamba groups and state are never pruned, so their own rules hold as
they did before.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from plait.ir.dsl.prune import axis_width, structure_problem
from plait.ir.errors import PlaitError
from plait.ir.job import PRUNE_AXES, AxisSearch, PruneJob
from plait.ir.model import ModelSpec

from .axes import AXIS_KIND, LAYOUT_DIVISOR, prune_facet

HARDWARE_MULTIPLE = {"hidden": 256, "ffn": 512, "mamba_head_dim": 8, "experts": 1}
MIN_MULTIPLES = 8
MIN_FRACTION = 0.25


def default_step(model: ModelSpec, name: str) -> int:
    """The snapping multiple of an axis for this model: its kind's structural multiple (whole KV
    or mamba groups, prune facet ``axis_step``), else the hardware multiple."""
    original = axis_width(model, name)
    kind = AXIS_KIND[name]
    structural = prune_facet(kind).axis_step(model, name) if kind is not None else None
    if structural is not None:
        return structural
    step = HARDWARE_MULTIPLE[name]
    while step > 1 and original < MIN_MULTIPLES * step:
        step //= 2
    return step


def layout_divisors(job: PruneJob, chosen: dict | None = None) -> dict[str, int]:
    """Axis -> the parallel size that must divide it, from the job's layout pins, its train
    setup's pins and ``chosen`` (e.g. the layout throughput is predicted under)."""
    sizes = {"tp": 1, "ep": 1}
    for pins in (job.layout.as_dict(), job.train.layout.as_dict() if job.train else {}, chosen or {}):
        for key in sizes:
            value = pins.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                sizes[key] = math.lcm(sizes[key], value)
    return {axis: sizes[key] for axis, key in LAYOUT_DIVISOR.items() if sizes[key] > 1}


@dataclass(frozen=True)
class AxisWidths:
    name: str
    original: int
    widths: tuple[int, ...]  # ascending, the original last

    @property
    def searched(self) -> bool:
        return len(self.widths) > 1 or self.widths[0] != self.original


def axis_widths(job: PruneJob, divisors: dict[str, int]) -> dict[str, AxisWidths]:
    """Candidate widths of every axis the model has."""
    model = job.model
    out = {}
    for name in PRUNE_AXES:
        kind = AXIS_KIND[name]
        if kind is not None and kind not in model.layers:
            continue
        out[name] = _widths(model, job.axis(name), divisors.get(name, 1))
    return out


def _widths(model: ModelSpec, axis: AxisSearch, divisor: int) -> AxisWidths:
    name, original = axis.name, axis_width(model, axis.name)
    if axis.mode == "keep":
        _check_layout(name, original, divisor, "the model's")
        return AxisWidths(name, original, (original,))
    if axis.mode == "fixed":
        _check_layout(name, axis.value, divisor, "the job's")
        return AxisWidths(name, original, (axis.value,))
    step = axis.step or default_step(model, name)
    low = axis.low if axis.low is not None else max(step, math.ceil(MIN_FRACTION * original / step) * step)
    high = axis.high if axis.high is not None else original
    grid = set(range(math.ceil(low / step) * step, high + 1, step)) | ({original} if high == original else set())
    legal = sorted(w for w in grid if w >= 1 and w % divisor == 0 and structure_problem(model, name, w) is None)
    if not legal:
        rule = f" and divisible by {LAYOUT_DIVISOR[name]} ({divisor})" if divisor > 1 else ""
        raise PlaitError(f"{name} has no legal width in [{low}, {high}] on multiples of {step}{rule}",
                         hint=_structure_hint(model, name))
    return AxisWidths(name, original, tuple(legal))


def _check_layout(name: str, width: int, divisor: int, whose: str) -> None:
    if width % divisor:
        key = LAYOUT_DIVISOR[name]
        raise PlaitError(f"{whose} {name} ({width}) must be divisible by {key} ({divisor}) to run under the "
                         f"layouts the job names: {width} % {divisor} = {width % divisor}",
                         hint=f"pick a {name} that {key} = {divisor} divides, or relax the layout")


def _structure_hint(model: ModelSpec, name: str) -> str:
    kind = AXIS_KIND[name]
    hint = prune_facet(kind).structure_hint(model, name) if kind is not None else None
    return hint or "widen the range or lower the step"


def depth_counts(job: PruneJob, kind: str) -> tuple[int, ...]:
    """Layers of ``kind`` the pruned model may keep: 1..all when depth may shrink that kind (a
    kind never disappears: the architecture keeps its block kinds), else all."""
    n = job.model.count(kind)
    return tuple(range(1, n + 1)) if kind in job.depth else (n,)
