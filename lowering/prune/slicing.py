"""Slice a source model's weights down to a PrunePlan: the result loads into ``build_model(plan.model)``
with no missing, unexpected or misshapen tensor, and has exactly the plan's parameter count.

Per tensor, one index per dimension (None: keep the dimension whole):

    embedding channels   every tensor with a hidden dimension: embeddings, every norm, the input
                         columns of q/k/v, gate/up, in_proj, router, shared gate and expert
                         gate_up; the output rows of o_proj, down_proj, out_proj, expert down
    a mixer's units      its kind's ``slice_index`` (prune facet, plait/kinds/<kind>/prune.py):
                         q_proj rows and o_proj columns of the kept query heads (attention), gate /
                         up rows and down columns (ffn neurons), in_proj / conv / norm / out_proj
                         pieces of the kept heads and channels (mamba), the router, expert bias
                         and expert weights of the kept experts (moe)
    depth                kept layers are renumbered in order
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from plait.ir import counts, kinds
from plait.ir.errors import PlaitError
from plait.ir.model import ModelSpec
from plait.ir.plan import LayerKeep, PrunePlan


def _idx(values) -> torch.Tensor:
    return torch.as_tensor(list(values), dtype=torch.long)


def _take(t: torch.Tensor, index: tuple[Optional[Sequence[int]], ...]) -> torch.Tensor:
    for dim, idx in enumerate(index):
        if idx is not None:
            t = t.index_select(dim, _idx(idx))
    return t.contiguous()


def _layer_index(leaf: str, keep: LayerKeep, src: ModelSpec, hidden: list[int]) -> tuple:
    if leaf.startswith("norm."):
        return (hidden,)
    return kinds.facet(keep.kind, "prune").slice_index(leaf[len("mixer."):], keep, src, hidden)


def slice_state_dict(state: Mapping[str, torch.Tensor], source: ModelSpec, plan: PrunePlan) -> dict[str, torch.Tensor]:
    """The pruned model's state dict (reference-model names) from the source model's."""
    hk = list(plan.hidden)
    out: dict[str, torch.Tensor] = {}
    by_layer = {k.layer: (new, k) for new, k in enumerate(plan.layers)}
    for name, tensor in state.items():
        if name.startswith("layers."):
            _, i, leaf = name.split(".", 2)
            if int(i) not in by_layer:
                continue  # a dropped layer
            new, keep = by_layer[int(i)]
            out[f"layers.{new}.{leaf}"] = _take(tensor, _layer_index(leaf, keep, source, hk))
        elif name in ("embed.weight", "pos_embed.weight", "head.weight"):
            out[name] = _take(tensor, (None, hk))
        elif name.startswith("final_norm."):
            out[name] = _take(tensor, (hk,))
        else:
            raise PlaitError(f"cannot slice tensor {name!r}: not a reference-model name")
    return out


def check_pruned(state: Mapping[str, torch.Tensor], plan: PrunePlan) -> int:
    """Parameters in ``state`` (buffers such as the expert bias excluded); must equal the plan's."""
    from plait.lowering.build import build_model

    with torch.device("meta"):
        reference = build_model(plan.model, device="meta")
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        diff = sorted(set(expected.items()) ^ set(got.items()))[:4]
        raise PlaitError(f"sliced weights do not match the pruned spec: {diff}")
    n = sum(int(torch.Size(expected[k]).numel()) for k, _ in reference.named_parameters())
    if n != plan.chosen.params or n != counts.params(plan.model).total:
        raise PlaitError(f"sliced model has {n:,} parameters, the plan says {plan.chosen.params:,}")
    return n
