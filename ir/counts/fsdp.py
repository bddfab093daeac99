"""FSDP2's shard padding: the parameters one rank holds beyond ``params / shards``.

torch's fully_shard splits every parameter along one dim into ``shards`` equal chunks. plait's
runtime picks the first dim that divides by ``shards`` (`fsdp_shard_dim`; FSDP2 shards only dim 0
unevenly): a grouped expert tensor [experts / ep, 2 * ffn, hidden] over more ranks than it has
local experts then splits its ffn rows instead of leaving whole experts on some ranks. Only a
tensor with no such dim is padded: dim 0 up to a multiple of ``shards`` (each rank allocates
ceil(rows / shards) rows; the last ranks' chunks are short or empty). So the first rank of the
group holds ``(params + padding) / shards`` parameters, with

    padding = sum over tensors with no dim divisible by shards of (-rows mod shards) * row size

for the rank's (TP / EP / ETP-local) tensors: e.g. a LayerNorm bias [hidden] over 3 ranks when 3
does not divide hidden. The planner adds it to the rank's parameters under FSDP.

The tensors are listed per layer kind (each kind's counts facet, ``shapes``), as their shapes on
one rank: the same modules lowering/build.py instantiates and the TP / EP splits lowering/passes
apply. The tests
(tests/ir/test_counts_fsdp.py) check that they add up to the parameter counts of counts/__init__.py
(the one source of those) for every spec in the library and equal the reference and lowered
modules' tensors.
"""
from __future__ import annotations

import math
from typing import Iterable

from .. import kinds
from ..model import ModelSpec

Shapes = tuple[tuple[int, ...], ...]  # the shape of each tensor on one rank


def linear_shapes(n_in: int, n_out: int, bias: bool, out_parts: int = 1, in_parts: int = 1) -> Shapes:
    """nn.Linear(n_in, n_out): weight [n_out / out_parts, n_in / in_parts], bias [n_out / out_parts]
    (a row-parallel linear's bias, added after the reduction, stays whole: out_parts = 1)."""
    rows = n_out // out_parts
    return ((rows, n_in // in_parts),) + (((rows,),) if bias else ())


def norm_shapes(model: ModelSpec, width: int | None = None) -> Shapes:
    """Scale (and LayerNorm's bias) of one norm over ``width`` (default hidden) channels."""
    width = model.hidden if width is None else width
    return ((width,),) * (2 if model.norm.kind == "layernorm" else 1)


def ffn_shapes(hidden: int, ffn: int, gated: bool, bias: bool, tp: int) -> Shapes:
    """A feed-forward network hidden -> ffn -> hidden, column- then row-parallel over ``tp``."""
    up = linear_shapes(hidden, ffn, bias, tp) * (2 if gated else 1)
    return up + linear_shapes(ffn, hidden, False, in_parts=tp) + (((hidden,),) if bias else ())


def layer_shapes(model: ModelSpec, kind: str, tp: int = 1, ep: int = 1,
                 etp: int = 1) -> tuple[Shapes, Shapes]:
    """(dense, expert) tensors of one layer of ``kind`` (pre-norm included) on one rank."""
    dense, expert = kinds.facet(kind, "counts").shapes(model, tp, ep, etp)
    return norm_shapes(model) + dense, expert


def embedding_shapes(model: ModelSpec, tp: int = 1) -> Shapes:
    """The vocabulary-parallel embedding [vocab / tp, hidden] and learned positions [max_seq, hidden]."""
    out = ((model.vocab // tp, model.hidden),)
    return out + (((model.max_seq, model.hidden),) if model.learned_positions else ())


def head_shapes(model: ModelSpec, tp: int = 1, own_copy: bool = False) -> Shapes:
    """The final norm and the output head [vocab / tp, hidden]; a tied head only when the last
    stage keeps its ``own_copy`` of the embedding."""
    head = () if model.tie_embeddings and not own_copy else ((model.vocab // tp, model.hidden),)
    return norm_shapes(model) + head


def fsdp_shard_dim(shape: tuple[int, ...], shards: int) -> int:
    """The dim FSDP shards a tensor of ``shape`` along: the first one that divides by ``shards``,
    else dim 0 (padded; FSDP2 shards other dims only evenly)."""
    return next((d for d, n in enumerate(shape) if n % shards == 0), 0)


def fsdp_padding(shapes: Iterable[tuple[int, ...]], shards: int) -> int:
    """Parameters FSDP pads the tensors of ``shapes`` with over ``shards`` ranks (see above)."""
    return sum((-s[0] % shards) * math.prod(s[1:]) for s in shapes
               if s and s[fsdp_shard_dim(s, shards)] % shards)


def params_of(shapes: Iterable[tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes)
