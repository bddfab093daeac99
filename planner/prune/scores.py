"""Importance scores of a model's prunable structures, and what a width keeps of them.

Estimators live elsewhere (lowering/prune/importance.py runs forward hooks for Minitron's
activation scores and reads weight magnitudes); this module holds the scores as plain data and
answers the planner's two questions: which indices to keep at a width, and what fraction of an
axis's importance that keeps. Scores are non-negative; larger is more important.

Per layer, ``units`` scores what its kind's first prune axis narrows: ffn neurons (mlp), query heads
(attention), heads (mamba) or experts (moe); ``channels`` what a second axis narrows, the head
channels of a mamba layer (one ranking shared by its heads);
``block`` scores the whole layer for depth pruning (1 - cos(input, output)).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from typing import Optional

from plait.ir import counts
from plait.ir.dsl.prune import axis_width
from plait.ir.errors import PlaitError
from plait.ir.model import ModelSpec
from plait.ir.serde import from_json, to_json

from .axes import AXIS_KIND, channel_axis, is_channel_axis, prune_facet, unit_axis


@dataclass(frozen=True)
class LayerScores:
    layer: int
    kind: str
    units: tuple[float, ...]
    channels: tuple[float, ...] = ()
    block: float = 1.0


@dataclass(frozen=True)
class ImportanceScores:
    model: str
    method: str  # activation | magnitude | random | uniform
    hidden: tuple[float, ...]
    layers: tuple[LayerScores, ...]
    tokens: int = 0  # calibration tokens behind the scores

    def to_json(self) -> str:
        return to_json(self)

    @staticmethod
    def from_json(text: str) -> "ImportanceScores":
        return from_json(ImportanceScores, text)

    def of_kind(self, kind: str) -> tuple[LayerScores, ...]:
        return tuple(s for s in self.layers if s.kind == kind)


def _shape(model: ModelSpec, kind: str) -> tuple[int, int]:
    """(units, channels per unit) a layer of ``kind`` has scores for (channels 0: none ranked)."""
    channels = channel_axis(kind)
    return (axis_original(model, unit_axis(kind)),
            axis_original(model, channels) if channels is not None else 0)


def check_scores(scores: ImportanceScores, model: ModelSpec) -> None:
    """Scores must describe ``model`` exactly (one entry per layer, every width right)."""
    def bad(what: str) -> PlaitError:
        return PlaitError(f"importance scores do not match model {model.name!r}: {what}",
                          hint="re-run the calibration for this model")
    if len(scores.hidden) != model.hidden:
        raise bad(f"{len(scores.hidden)} embedding channels, the model has {model.hidden}")
    if len(scores.layers) != model.num_layers:
        raise bad(f"{len(scores.layers)} layers, the model has {model.num_layers}")
    for i, (s, kind) in enumerate(zip(scores.layers, model.layers)):
        units, channels = _shape(model, kind)
        if s.kind != kind or len(s.units) != units or len(s.channels) != channels:
            raise bad(f"layer {i} is {s.kind} with {len(s.units)} units / {len(s.channels)} channels, "
                      f"the model's is {kind} with {units} / {channels}")


def uniform_scores(model: ModelSpec) -> ImportanceScores:
    """Every structure equally important: the prior when no weights are available (a width then
    keeps the fraction width / original of its axis)."""
    return _scores(model, "uniform", lambda n: (1.0,) * n)


def random_scores(model: ModelSpec, seed: int = 0) -> ImportanceScores:
    """Uniform random scores: the baseline an importance estimator must beat."""
    rng = random.Random(seed)
    return _scores(model, "random", lambda n: tuple(rng.random() for _ in range(n)))


def _scores(model: ModelSpec, method: str, draw) -> ImportanceScores:
    layers = []
    for i, kind in enumerate(model.layers):
        units, channels = _shape(model, kind)
        layers.append(LayerScores(i, kind, draw(units), draw(channels), draw(1)[0]))
    return ImportanceScores(model.name, method, draw(model.hidden), tuple(layers))


# ------------------------------------------------------------------------------------------------
# Which indices a width keeps
# ------------------------------------------------------------------------------------------------

def top_indices(scores: tuple[float, ...], k: int) -> tuple[int, ...]:
    """The ``k`` highest-scoring indices (ties: the lower index), ascending."""
    order = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)  # stable: ties keep index order
    return tuple(sorted(order[:k]))


def grouped_top_indices(scores: tuple[float, ...], groups: int, per_group: int) -> tuple[int, ...]:
    """``per_group`` best indices inside each of ``groups`` equal consecutive groups, ascending."""
    size = len(scores) // groups
    out: list[int] = []
    for g in range(groups):
        out += [g * size + i for i in top_indices(scores[g * size:(g + 1) * size], per_group)]
    return tuple(out)


def unit_groups(model: ModelSpec, kind: str) -> int:
    """Equal groups the units of a ``kind`` layer are ranked within (and kept equally from)."""
    return prune_facet(kind).axis_groups(model, unit_axis(kind))


def keep_units(model: ModelSpec, s: LayerScores, width: int) -> tuple[int, ...]:
    groups = unit_groups(model, s.kind)
    return grouped_top_indices(s.units, groups, width // groups)


# ------------------------------------------------------------------------------------------------
# What fraction of an axis's importance a width keeps
# ------------------------------------------------------------------------------------------------

def _prefix(scores: tuple[float, ...], groups: int) -> tuple[tuple[float, ...], ...]:
    """Per group, the running sums of its scores sorted high to low (index k: the best k)."""
    size = len(scores) // groups
    return tuple((0.0, *accumulate(sorted(scores[g * size:(g + 1) * size], reverse=True))) for g in range(groups))


def _fraction(kept: float, total: float, width: int, original: int) -> float:
    """kept / total; an axis whose scores are all zero keeps width / original."""
    return kept / total if total > 0 else width / original


class Retention:
    """Fractions of importance kept, per axis and width, summed over the layers that have the axis
    (every layer of a kind keeps the same width). Sorted running sums are built once per axis."""

    def __init__(self, scores: ImportanceScores, model: ModelSpec):
        self.scores, self.model = scores, model
        self._sums: dict[str, tuple] = {}
        self._kept_cache: dict[tuple[str, int], float] = {}

    def _axis_sums(self, name: str) -> tuple:
        """(per layer, per group running sums; groups) of an axis."""
        if name not in self._sums:
            if name == "hidden":
                rows, groups = [self.scores.hidden], 1
            elif name.startswith("depth:"):
                rows, groups = [tuple(s.block for s in self.scores.of_kind(name[6:]))], 1
            else:
                kind = AXIS_KIND[name]
                field = "channels" if is_channel_axis(name) else "units"
                rows = [getattr(s, field) for s in self.scores.of_kind(kind)]
                groups = prune_facet(kind).axis_groups(self.model, name)
            self._sums[name] = (tuple(_prefix(r, groups) for r in rows), groups)
        return self._sums[name]

    def _kept(self, name: str, width: int, original: int) -> float:
        key = (name, width)
        if key not in self._kept_cache:
            layers, groups = self._axis_sums(name)
            kept = sum(g[width // groups] for layer in layers for g in layer)
            total = sum(g[-1] for layer in layers for g in layer)
            self._kept_cache[key] = _fraction(kept, total, width, original)
        return self._kept_cache[key]

    def axis(self, name: str, width: int) -> float:
        return self._kept(name, width, axis_original(self.model, name))

    def depth(self, kind: str, count: int) -> float:
        return self._kept("depth:" + kind, count, self.model.count(kind))

    def kept_layers(self, kind: str, count: int) -> tuple[int, ...]:
        """Model indices of the ``count`` most important layers of ``kind``."""
        layers = self.scores.of_kind(kind)
        return tuple(layers[i].layer for i in top_indices(tuple(s.block for s in layers), count))


def axis_original(model: ModelSpec, name: str) -> int:
    """The model's width on axis ``name``."""
    return axis_width(model, name)


@lru_cache(maxsize=1024)
def axis_weight(model: ModelSpec, name: str) -> float:
    """How much of the model an axis reaches: the share of its parameters in the layers the axis
    narrows (hidden: all of them). An axis that touches more weights counts more."""
    if name == "hidden":
        return 1.0
    kind = name[6:] if name.startswith("depth:") else AXIS_KIND[name]
    p = counts.params(model)
    return p.of_kind(kind) / p.total


def weighted_log(model: ModelSpec, name: str, fraction: float) -> float:
    """An axis's term of the objective: weight x log(retained fraction). The ILP maximises their
    sum, the log of the weighted geometric mean of the retained fractions."""
    return axis_weight(model, name) * math.log(max(fraction, 1e-12))


def score(model: ModelSpec, retained) -> float:
    """exp(sum of weighted logs): the retained importance of a candidate, in (0, 1]."""
    return math.exp(sum(weighted_log(model, a, f) for a, f in retained))


def method_of(scores: Optional[ImportanceScores]) -> str:
    return "uniform" if scores is None else scores.method
