"""Compile-time caches keyed on what a graph *is*, never on which object holds it.

Lowering traces the reference model once per rank and fake-runs graphs to check shapes after
several passes; for a tiny model that was seconds of CPU per rank, most of it repeating identical
work (every rank traces the same model; ranks that differ only in DP or EP coordinates fake-run the
same graph). Two caches remove the repetition:

- traces: the traced, annotated, shape-recorded graph of a model, keyed on the model IR, the
  micro-batch shape and the model's structure (`module_key`). A hit re-binds a copy of the graph to
  the new model's own modules, so its weights (and what passes later do to them) stay its own.
- shapes: the tensor metadata a fake run records on a graph's nodes, keyed on the graph's code,
  every submodule's structure and parameter shapes, and the example inputs' shapes.

A structure key covers everything a forward reads besides tensor values: module types, plain
attributes (ints, floats, strings, frozen IR dataclasses), parameter / buffer names, shapes, dtypes,
devices and sharing. An attribute the key cannot describe makes the module uncacheable (a miss,
never a wrong hit). `disabled()` turns both caches off (tests compare cached with uncached output).
"""
from __future__ import annotations

import copy
import dataclasses
import types
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Hashable, Optional

import torch
import torch.fx

_LIMIT = 64  # entries per cache; a graph template is a few hundred nodes, no tensors
_enabled = True


class Uncacheable(Exception):
    """A module holds state a structure key cannot describe."""


class LRU:
    def __init__(self, limit: int = _LIMIT):
        self.limit, self.items = limit, OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: Hashable) -> Any:
        if key in self.items:
            self.hits += 1
            self.items.move_to_end(key)
            return self.items[key]
        self.misses += 1
        return None

    def put(self, key: Hashable, value: Any) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.limit:
            self.items.popitem(last=False)

    def clear(self) -> None:
        self.items.clear()
        self.hits = self.misses = 0


TRACES, SHAPES = LRU(), LRU()


def enabled() -> bool:
    return _enabled


@contextmanager
def disabled():
    """Neither cache is read nor written inside (every trace and fake run done afresh)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def clear() -> None:
    TRACES.clear()
    SHAPES.clear()


def _plain(value: Any) -> Hashable:
    """A hashable description of an attribute value, or Uncacheable."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return (type(value).__name__, value)
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype), value.device.type)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_plain(v) for v in value))
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType)):  # e.g. an activation
        return ("function", value.__module__, value.__qualname__)
    if dataclasses.is_dataclass(value) and not isinstance(value, type) \
            and type(value).__dataclass_params__.frozen:
        try:
            hash(value)
        except TypeError as err:
            raise Uncacheable(type(value).__name__) from err
        return (type(value).__qualname__, value)
    if type(value).__module__.startswith("plait.") and hasattr(value, "__dict__") \
            and not isinstance(value, (type, torch.nn.Module)):  # a helper object (a dispatcher):
        return (type(value).__qualname__,                        # its state is its attributes
                tuple(sorted((k, _plain(v)) for k, v in vars(value).items())))
    raise Uncacheable(type(value).__name__)


def _own_state(name: str, module: torch.nn.Module) -> tuple:
    """What ``module``'s own forward depends on besides its children and tensors' values."""
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    if isinstance(module, torch.fx.GraphModule):  # its forward is its code; attributes it reads
        tensors = tuple(sorted((k, _plain(v)) for k, v in vars(module).items()  # are get_attr's
                               if isinstance(v, torch.Tensor)))
        return (name, kind, module.code, tensors)
    attrs = tuple(sorted((k, _plain(v)) for k, v in vars(module).items()
                         if not k.startswith("_")))
    return (name, kind, attrs)


def module_key(model: torch.nn.Module) -> Optional[tuple]:
    """The structure of ``model`` (see the module docstring), or None when it is uncacheable."""
    try:
        modules = tuple(_own_state(n, m) for n, m in model.named_modules(remove_duplicate=False))
    except Uncacheable:
        return None
    first: dict[int, str] = {}
    tensors = []
    for kind, named in (("p", model.named_parameters(remove_duplicate=False)),
                        ("b", model.named_buffers(remove_duplicate=False))):
        for n, t in named:
            shared = first.setdefault(id(t), n)  # tied weights are part of the structure
            tensors.append((kind, n, tuple(t.shape), str(t.dtype), t.device.type, t.requires_grad,
                            shared))
    return modules, tuple(tensors)


def _inputs_key(example: tuple) -> tuple:
    return tuple((tuple(t.shape), str(t.dtype), t.device.type) for t in example)


def traced(model: torch.nn.Module, key_extra: Hashable,
           trace: Callable[[], torch.fx.GraphModule]) -> torch.fx.GraphModule:
    """``trace()`` (a GraphModule over ``model``) or a cached twin of it bound to ``model``."""
    key = module_key(model) if _enabled else None
    if key is None:
        return trace()
    key = (key_extra, key)
    hit = TRACES.get(key)
    if hit is not None and _binds(model, hit[0]):
        graph, meta, name = hit
        gm = torch.fx.GraphModule(model, copy.deepcopy(graph), name)
        gm.meta.update(_copy_meta(meta))
        return gm
    gm = trace()
    TRACES.put(key, (copy.deepcopy(gm.graph), _copy_meta(gm.meta), type(gm).__name__))
    return gm


def _binds(model: torch.nn.Module, graph: torch.fx.Graph) -> bool:
    """Every attribute the graph reads exists on ``model`` (tracing may add constants to the
    traced root, which a fresh model lacks: then trace afresh)."""
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            try:
                model.get_submodule(node.target) if node.op == "call_module" else \
                    _get_attr(model, node.target)
            except AttributeError:
                return False
    return True


def _get_attr(model: torch.nn.Module, target: str) -> Any:
    owner, _, leaf = target.rpartition(".")
    holder = model.get_submodule(owner) if owner else model
    if not hasattr(holder, leaf):
        raise AttributeError(target)
    return getattr(holder, leaf)


def _copy_meta(meta: dict) -> dict:
    """Sets and dicts copied (passes add facts and entries); IR values are frozen and shared."""
    return {k: copy.copy(v) if isinstance(v, (set, dict, list)) else v for k, v in meta.items()}


def shapes_recorded(gm: torch.fx.GraphModule, example: tuple,
                    propagate: Callable[[], None]) -> None:
    """Run ``propagate()`` (a fake run writing node.meta["tensor_meta"] / ["type"]) or replay the
    metadata a run of an identical graph wrote."""
    key = module_key(gm) if _enabled else None
    if key is None:
        propagate()
        return
    key = (key, _inputs_key(example))
    hit = SHAPES.get(key)
    if hit is None:
        before = {n.name: n.meta.get("tensor_meta") for n in gm.graph.nodes}
        propagate()
        hit = {n.name: (n.meta.get("tensor_meta"), n.meta.get("type"),
                        n.meta.get("tensor_meta") is not before[n.name]) for n in gm.graph.nodes}
        SHAPES.put(key, hit)
        return
    for node in gm.graph.nodes:
        tensor_meta, kind, written = hit[node.name]
        if written:  # a fake run leaves a node without tensor results untouched
            node.meta["tensor_meta"] = tensor_meta
        node.meta["type"] = kind
