"""How a reference parameter is made of Hugging Face checkpoint tensors: a recipe names one tensor
(Ref), concatenates parts along a dim (Cat: gate and up rows) or stacks them (Stack: per-expert
tensors into a grouped one). Pure names, no tensors: each block kind's hf facet
(plait/kinds/<kind>/hf.py) writes its recipes with these, lowering/weight_names.py and
lowering/weights.py apply them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class Ref:
    name: str


@dataclass(frozen=True)
class Cat:
    dim: int
    parts: tuple


@dataclass(frozen=True)
class Stack:
    parts: tuple


Recipe = Union[Ref, Cat, Stack]


def refs(recipe: Recipe) -> list[str]:
    """The checkpoint tensor names a recipe reads."""
    if isinstance(recipe, Ref):
        return [recipe.name]
    return [n for part in recipe.parts for n in refs(part)]
