"""A dense MLP's projections as pruning slices them (the mlp kind, and the moe kind's shared
expert, which is one): neurons are gate / up rows and down columns."""
from __future__ import annotations

from typing import Optional


def neuron_index(leaf: str, neurons: Optional[list[int]], hidden: list[int]) -> tuple:
    """Per dimension of projection parameter ``leaf`` ("up_proj.weight", ...), the kept
    ``neurons`` (None: all) and the kept ``hidden`` channels on the other side."""
    module, _, what = leaf.partition(".")
    if module == "down_proj":
        return (hidden, neurons) if what == "weight" else (hidden,)
    return (neurons, hidden) if what == "weight" else (neurons,)
