"""The block-kind registry: which kinds of block a model's layers may be, and where each kind's
one room is.

A block kind (attention with its GQA / MLA / sliding-window variants, dense MLP, MoE, Mamba2) lives
in one package, ``plait.kinds.<name>`` (folder ``plait/kinds/<name>/``), split into *facets* by
pipeline stage so that data still flows one way (dsl -> ir -> planner -> lowering -> runtime):

    counts       parameters, FLOPs, saved-activation bytes, FSDP shapes (imports ir only)
    hf           Hugging Face weight names and config fields written on export (imports ir only)
    dsl          the block's fields in a model spec, their canonical order, its prune axes and
                 train-job options (imports ir only)
    rules        layout legality (Megatron's divisibility rules) and what plait can execute
    cost         the planner's compute / communication / memory terms (imports ir, planner)
    module       the reference torch module (imports ir, lowering)
    parallelize  its TP / SP / CP sharding plan for the lowering passes (imports ir, lowering)
    prune        structured pruning: how its widths snap and narrow (imports ir only, so the
                 planner reads it without torch) and its importance and slicing hooks (lowering
                 helpers imported on call)

The core stages never import a kind's package directly and never branch on a kind's name: they
iterate over ``names()`` and ask ``facet(kind, "<facet>")`` for the kind's functions. A facet
module is imported on first use, so ir code asking for ``counts`` never loads torch.

Adding a kind: write ``plait/kinds/<name>/`` with every facet, add one ``Kind`` line below and its
block dataclass to ``ir/model.py`` (the IR's fields are frozen dataclasses every stage shares).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType

FACETS: tuple[str, ...] = ("counts", "hf", "dsl", "rules", "cost", "module", "parallelize", "prune")


@dataclass(frozen=True)
class Kind:
    name: str  # the layer name in specs and in ModelSpec.layers
    symbol: str  # its Megatron-Core hybrid-pattern symbol

    @property
    def package(self) -> str:
        return f"plait.kinds.{self.name}"


# Registry order is the canonical order (spec formatting, reports).
REGISTRY: tuple[Kind, ...] = (
    Kind("attention", "*"),
    Kind("mlp", "-"),
    Kind("moe", "E"),
    Kind("mamba", "M"),
)
_BY_NAME = {k.name: k for k in REGISTRY}


def names() -> tuple[str, ...]:
    return tuple(k.name for k in REGISTRY)


def kind(name: str) -> Kind:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown block kind {name!r}; kinds: {', '.join(names())}") from None


def by_symbol() -> dict[str, str]:
    """Hybrid-pattern symbol -> kind name."""
    return {k.symbol: k.name for k in REGISTRY}


@lru_cache(maxsize=None)  # the core asks per layer and per plan; a module is imported once anyway
def facet(name: str, which: str) -> ModuleType:
    """The ``which`` facet module of kind ``name`` (imported on first use)."""
    if which not in FACETS:
        raise KeyError(f"unknown facet {which!r}; facets: {', '.join(FACETS)}")
    return importlib.import_module(f"{kind(name).package}.{which}")
