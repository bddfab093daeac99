"""Pipeline units: the pieces a pipeline may cut the model into.

The smallest repeating block of layers (a Llama decoder layer [attention, mlp] is one unit) when
the layer sequence is periodic, otherwise single layers (a non-periodic hybrid pattern). The
legality table (how many stages a model can fill) and the planner (where stages may end) share it.
"""
from __future__ import annotations

from functools import lru_cache

from .model import ModelSpec


def units(model: ModelSpec) -> tuple[tuple[str, ...], ...]:
    """The layer sequence cut into pipeline units: repeats of its smallest period when the model is
    periodic (every unit identical), otherwise one unit per layer."""
    return _units(model.layers)


@lru_cache(maxsize=256)
def _units(layers: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    n = len(layers)
    for p in range(1, n // 2 + 1):
        if n % p == 0 and layers == layers[:p] * (n // p):
            return (layers[:p],) * (n // p)
    return tuple((k,) for k in layers)


def unit_name(model: ModelSpec) -> str:
    u = units(model)
    return "decoder layers" if len(u[0]) > 1 else "layers"
