"""The choices the pruning ILP picks from, with exact costs.

Every layer of one block kind has the same widths, and every width of a kind depends only on the
hidden size and that kind's own axes, so a pruned model is: one hidden size h, and per block kind
one option (its widths, how many of its layers stay). Given h the costs add up over kinds:

    params(model) = fixed(h) + sum_k count_k * layer_params_k(h, widths_k)

with fixed(h) the embedding, head and final norm. Every number comes from ir/counts evaluated on
the pruned spec, never from a formula here. Options dominated on every budget (costlier or equal
everywhere, no more importance) are dropped before the ILP sees them.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Callable, Optional

from plait.ir import counts
from plait.ir.model import ModelSpec

from .axes import KIND_AXES, prune_facet
from .scores import Retention, weighted_log

BUDGETS = ("params", "active_params", "weight_bytes", "seconds")


def pruned_spec(model: ModelSpec, hidden: int, widths: dict[str, int], layers: tuple[str, ...],
                name: Optional[str] = None) -> ModelSpec:
    """``model`` with hidden size ``hidden``, the axis widths in ``widths`` and layer sequence
    ``layers`` (blocks no layer uses are dropped). Each kind's prune facet checks it can be pruned
    so and narrows its own block."""
    blocks = {kind: getattr(model, kind, None) for kind in KIND_AXES}
    blocks = {kind: block for kind, block in blocks.items() if block is not None}
    for kind in blocks:
        prune_facet(kind).check_prunable(model, layers)
    blocks = {kind: prune_facet(kind).narrowed(block, widths) for kind, block in blocks.items()}
    out = replace(model, hidden=hidden, layers=layers, name=name or model.name, **blocks)
    unused = {k: None for k in KIND_AXES if k not in layers and getattr(out, k) is not None}
    return replace(out, **unused) if unused else out


@dataclass(frozen=True)
class Costs:
    """What one piece of the model costs on each budget."""

    params: int = 0
    active_params: int = 0
    weight_bytes: int = 0
    seconds: float = 0.0  # surrogate time per micro-batch (throughput targets only)

    def scaled(self, n: int) -> "Costs":
        return Costs(n * self.params, n * self.active_params, n * self.weight_bytes, n * self.seconds)

    def vector(self, budgets: tuple[str, ...]) -> tuple[float, ...]:
        return tuple(getattr(self, b) for b in budgets)


@dataclass(frozen=True)
class Option:
    """One block kind at one hidden size: its widths and how many of its layers stay."""

    kind: str
    widths: tuple[tuple[str, int], ...]
    count: int
    costs: Costs
    value: float  # weighted logs of the retained fractions of its axes and its depth


@dataclass(frozen=True)
class HiddenChoice:
    hidden: int
    costs: Costs  # embedding, head, final norm (+ surrogate extras)
    value: float
    options: tuple[tuple[Option, ...], ...]  # one tuple per block kind, in model order


LayerTime = Callable[[ModelSpec, str], float]  # (one-layer spec, kind) -> seconds
ExtraTime = Callable[[ModelSpec], float]  # spec -> embedding + head seconds


def layer_costs(spec: ModelSpec, kind: str, bytes_per_param: int, layer_time: Optional[LayerTime]) -> Costs:
    """One layer of ``kind`` in ``spec`` (pre-norm included), exactly as ir/counts counts it."""
    one = replace(spec, layers=(kind,))
    total = counts.layer_params(one, kind)
    active = total - counts.inactive_expert_params(one)
    seconds = layer_time(one, kind) if layer_time else 0.0
    return Costs(total, active, total * bytes_per_param, seconds)


def fixed_costs(spec: ModelSpec, bytes_per_param: int, extra_time: Optional[ExtraTime]) -> Costs:
    n = counts.embedding_params(spec) + counts.head_params(spec) + counts.final_norm_params(spec)
    return Costs(n, n, n * bytes_per_param, extra_time(spec) if extra_time else 0.0)


def kind_options(model: ModelSpec, hidden: int, kind: str, axis_widths: dict, counts_of: tuple[int, ...],
                 retention: Retention, budgets: tuple[str, ...], bytes_per_param: int,
                 layer_time: Optional[LayerTime]) -> tuple[Option, ...]:
    """Every (widths, count) of one kind at one hidden size, dominated ones dropped."""
    axes = KIND_AXES[kind]
    options = []
    for combo in itertools.product(*(axis_widths[a].widths for a in axes)):
        widths = dict(zip(axes, combo))
        spec = pruned_spec(model, hidden, widths, model.layers)
        per_layer = layer_costs(spec, kind, bytes_per_param, layer_time)
        width_value = sum(weighted_log(model, a, retention.axis(a, w)) for a, w in widths.items())
        for n in counts_of:
            depth_value = weighted_log(model, "depth:" + kind, retention.depth(kind, n))
            options.append(Option(kind, tuple(widths.items()), n, per_layer.scaled(n), width_value + depth_value))
    return pareto(options, budgets)


def pareto(options: list[Option], budgets: tuple[str, ...]) -> tuple[Option, ...]:
    """Options no other option beats: at most its cost on every budget and more importance (ties
    broken towards the earlier option)."""
    vectors = [o.costs.vector(budgets) for o in options]
    ranked = sorted(range(len(options)), key=lambda i: (-options[i].value, vectors[i], i))
    if len(budgets) == 1:  # one budget: keep the options whose cost beats every more valuable one
        kept, least = [], float("inf")
        for i in ranked:
            if vectors[i][0] < least:
                kept.append(i)
                least = vectors[i][0]
        return tuple(options[i] for i in kept)
    kept_vectors: list[tuple[float, ...]] = []
    kept = []
    for i in ranked:
        cost = vectors[i]
        if not any(all(k <= c for k, c in zip(other, cost)) for other in kept_vectors):
            kept.append(i)
            kept_vectors.append(cost)
    return tuple(options[i] for i in kept)
