"""Weight import: a transformers state dict or safetensors checkpoint -> the reference model's names.

Each reference parameter is described by a *recipe* over checkpoint tensors (a tensor by name, a
concatenation, or a stack of per-expert tensors), so one loader covers both the fused expert layout
of transformers 5 (``experts.gate_up_proj`` [E, 2I, H], gate rows first) and the per-expert layout
of hub checkpoints (``experts.{e}.w1/w3`` or ``gate_proj/up_proj``). Sharded ranks pass ``shard``
(reference name, full shape) -> index, and only that slice is read (``safe_open(...).get_slice``).

An index is a tuple with one entry per dimension: a ``slice`` (step 1), or a list of slices whose
pieces are concatenated (e.g. the gate rows and the up rows of one TP rank's fused gate_up shard).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from plait.ir.errors import PlaitError
from plait.ir.hf_recipes import Recipe, Ref, Stack, refs

from .weight_names import hf_candidates

Index = tuple[Union[slice, Sequence[slice]], ...]
ShardFn = Callable[[str, tuple[int, ...]], Optional[Index]]


# ---- sources --------------------------------------------------------------------------------------

class StateDictSource:
    """In-memory tensors by name (e.g. ``hf_model.state_dict()``)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = tensors

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        return self.tensors[name][index].detach()


class SafetensorsSource:
    """One or more ``.safetensors`` files (a file, a list of files, or a directory). Tensors are
    located by reading the file headers; ``read`` materialises only the requested slice."""

    def __init__(self, paths: Sequence[Path]):
        from safetensors import safe_open

        self.files = {}
        self.where: dict[str, Path] = {}
        for path in paths:
            handle = safe_open(str(path), framework="pt")
            self.files[path] = handle
            for key in handle.keys():
                self.where[key] = path

    def has(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.files[self.where[name]].get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        return self.files[self.where[name]].get_slice(name)[index]


Source = Union[StateDictSource, SafetensorsSource]


def open_source(src) -> Source:
    """A state dict, a safetensors file, a list of files, or a directory of them. A path that does
    not exist (or a directory without ``*.safetensors``) is a PlaitError naming it."""
    if isinstance(src, (StateDictSource, SafetensorsSource)):
        return src
    if isinstance(src, Mapping):
        return StateDictSource(src)
    paths = [Path(p) for p in (src if isinstance(src, (list, tuple)) else [src])]
    files: list[Path] = []
    for p in paths:
        if not p.exists():
            raise PlaitError(f"weight file not found: {p}")
        found = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
        if not found:
            raise PlaitError(f"no *.safetensors files in {p}")
        files += found
    return SafetensorsSource(files)


def model_type_of(src) -> str:
    """``model_type`` from the config.json beside a checkpoint (its directory, or a file's folder)."""
    if isinstance(src, Mapping) or isinstance(src, (list, tuple, StateDictSource, SafetensorsSource)):
        raise PlaitError("cannot tell the checkpoint's model type", hint="pass model_type= explicitly")
    path = Path(src)
    cfg = (path if path.is_dir() else path.parent) / "config.json"
    if not cfg.exists():
        raise PlaitError(f"no config.json beside {path}", hint="pass model_type= explicitly")
    return json.loads(cfg.read_text())["model_type"]


# ---- recipes --------------------------------------------------------------------------------------

def recipe_shape(source: Source, recipe: Recipe) -> tuple[int, ...]:
    if isinstance(recipe, Ref):
        return source.shape(recipe.name)
    shapes = [recipe_shape(source, p) for p in recipe.parts]
    if isinstance(recipe, Stack):
        return (len(shapes), *shapes[0])
    out = list(shapes[0])
    out[recipe.dim] = sum(s[recipe.dim] for s in shapes)
    return tuple(out)


def read_recipe(source: Source, recipe: Recipe, index: tuple[slice, ...]) -> torch.Tensor:
    """The slice ``index`` (one step-1 slice per dim, bounds resolved) of the tensor ``recipe``
    describes, reading from the source only the pieces that overlap it."""
    if isinstance(recipe, Ref):
        return source.read(recipe.name, index)
    if isinstance(recipe, Stack):
        picked = recipe.parts[index[0]]
        return torch.stack([read_recipe(source, p, index[1:]) for p in picked])
    d, want = recipe.dim, index[recipe.dim]
    pieces, offset = [], 0
    for part in recipe.parts:
        size = recipe_shape(source, part)[d]
        lo, hi = max(want.start, offset), min(want.stop, offset + size)
        if lo < hi:
            sub = list(index)
            sub[d] = slice(lo - offset, hi - offset)
            pieces.append(read_recipe(source, part, tuple(sub)))
        offset += size
    return torch.cat(pieces, dim=d)


def read_index(source: Source, recipe: Recipe, shape: tuple[int, ...], index: Optional[Index]) -> torch.Tensor:
    """Read ``index`` (slices or lists of slices per dim; None: everything) of a recipe."""
    index = tuple(index or ()) + (slice(None),) * (len(shape) - len(index or ()))
    for d, entry in enumerate(index):
        if isinstance(entry, (list, tuple)):  # a list of slices: read each piece, concatenate
            pieces = [read_index(source, recipe, shape, index[:d] + (s,) + index[d + 1:]) for s in entry]
            return torch.cat(pieces, dim=d)
    resolved = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
    for s, n in zip(index, shape):
        if s.step not in (None, 1):
            raise ValueError(f"shard slices must have step 1, got {s}")
    return read_recipe(source, recipe, resolved)


# ---- loading --------------------------------------------------------------------------------------

def resolve_recipe(source: Source, name: str, candidates: list[Recipe]) -> Recipe:
    for recipe in candidates:
        if all(source.has(n) for n in refs(recipe)):
            return recipe
    tried = sorted({n for r in candidates for n in refs(r)})[:6]
    raise PlaitError(f"checkpoint has no tensor for {name!r}", hint=f"looked for {', '.join(tried)}")


def load_hf_weights(target: Union[nn.Module, Mapping[str, torch.Tensor]], source, spec, model_type: Optional[str] = None,
                    shard: Optional[ShardFn] = None, rename: Optional[Callable[[str], str]] = None) -> list[str]:
    """Copy checkpoint weights into ``target`` (a module, or a dict name -> tensor filled in place).

    ``spec``: the ModelSpec (layer kinds decide the name mapping); ``model_type``: the HF model type
    (read from ``source``/config.json when it is a directory); ``shard(ref_name, full_shape)`` gives
    the slice this rank holds; ``rename(local_name) -> reference name`` for programs whose parameter
    names differ from the reference model's. Returns the reference names loaded."""
    if model_type is None:
        model_type = model_type_of(source)
    source = open_source(source)
    tensors = _target_tensors(target)
    loaded = []
    for local_name, dest in tensors.items():
        name = rename(local_name) if rename else local_name
        recipe = resolve_recipe(source, name, hf_candidates(model_type, spec, name))
        full = recipe_shape(source, recipe)
        value = read_index(source, recipe, full, shard(name, full) if shard else None)
        if tuple(value.shape) != tuple(dest.shape):
            raise PlaitError(f"shape mismatch for {name!r}: checkpoint {tuple(value.shape)} "
                             f"(full {full}), model {tuple(dest.shape)}")
        with torch.no_grad():
            dest.copy_(value)
        loaded.append(name)
    return loaded


def _target_tensors(target) -> dict[str, torch.Tensor]:
    if isinstance(target, nn.Module):
        out = dict(target.named_parameters())
        out.update({k: v for k, v in target.named_buffers() if _persistent(target, k)})
        return out
    return dict(target)


def _persistent(module: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    mod = module.get_submodule(owner) if owner else module
    return leaf not in mod._non_persistent_buffers_set
