"""Slice a source model's weights down to a PrunePlan: the result loads into ``build_model(plan.model)``
with no missing, unexpected or misshapen tensor, and has exactly the plan's parameter count.

Per tensor, one index per dimension (None: keep the dimension whole):

    embedding channels   every tensor with a hidden dimension: embeddings, every norm, the input
                         columns of q/k/v, gate/up, in_proj, router, shared gate and expert
                         gate_up; the output rows of o_proj, down_proj, out_proj, expert down
    attention heads      q_proj rows and o_proj columns of the kept query heads (the same count in
                         every KV group, so k_proj / v_proj stay whole)
    ffn neurons          gate/up rows, down columns
    mamba heads+channels in_proj's z and x rows (head h, channel c at h * head_dim + c) and dt rows,
                         conv channels of x, the gated norm, out_proj columns, per-head A_log, D,
                         dt_bias; B and C (groups x state) stay whole
    experts              router rows, the expert bias, the experts' weights
    depth                kept layers are renumbered in order
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from plait.ir import counts
from plait.ir.errors import PlaitError
from plait.ir.model import ModelSpec
from plait.ir.plan import LayerKeep, PrunePlan

Index = Optional[torch.Tensor]


def _idx(values) -> torch.Tensor:
    return torch.as_tensor(list(values), dtype=torch.long)


def _take(t: torch.Tensor, index: tuple[Index, ...]) -> torch.Tensor:
    for dim, idx in enumerate(index):
        if idx is not None:
            t = t.index_select(dim, idx)
    return t.contiguous()


def mamba_inner(keep: LayerKeep, head_dim: int) -> list[int]:
    """Positions in d_inner of the kept (head, channel) pairs."""
    return [h * head_dim + c for h in keep.units for c in keep.channels]


def _attention(leaf: str, keep: LayerKeep, src: ModelSpec, hk) -> tuple[Index, ...]:
    hd = src.block("attention").head_dim
    heads = _idx(h * hd + c for h in keep.units for c in range(hd))
    table = {"q_proj.weight": (heads, hk), "q_proj.bias": (heads,), "k_proj.weight": (None, hk),
             "v_proj.weight": (None, hk), "o_proj.weight": (hk, heads), "o_proj.bias": (hk,)}
    return table.get(leaf, (None,))  # k/v biases, q/k norms: whole


def _mlp(leaf: str, units, hk) -> tuple[Index, ...]:
    module, _, kind = leaf.partition(".")
    if module == "down_proj":
        return (hk, units) if kind == "weight" else (hk,)
    return (units, hk) if kind == "weight" else (units,)


def _mamba(leaf: str, keep: LayerKeep, src: ModelSpec, hk) -> tuple[Index, ...]:
    m = src.block("mamba")
    inner = mamba_inner(keep, m.head_dim)
    bc = list(range(m.d_inner, m.d_inner + 2 * m.groups * m.state))
    conv = _idx(inner + bc)
    rows = _idx(inner + [m.d_inner + i for i in inner] + [m.d_inner + b for b in bc]
                + [m.d_inner + m.conv_channels + h for h in keep.units])
    heads = _idx(keep.units)
    table = {"in_proj.weight": (rows, hk), "in_proj.bias": (rows,), "conv1d.weight": (conv,),
             "conv1d.bias": (conv,), "dt_bias": (heads,), "A_log": (heads,), "D": (heads,),
             "norm.weight": (_idx(inner),), "out_proj.weight": (hk, _idx(inner)), "out_proj.bias": (hk,)}
    return table[leaf]


def _moe(leaf: str, keep: LayerKeep, hk) -> tuple[Index, ...]:
    experts = _idx(keep.units)
    if leaf.startswith("shared."):
        return _mlp(leaf[len("shared."):], None, hk)
    table = {"router.weight": (experts, hk), "expert_bias": (experts,), "shared_gate.weight": (None, hk),
             "experts.w_gate_up": (experts, None, hk), "experts.w_down": (experts, hk, None)}
    return table[leaf]


def _layer_index(leaf: str, keep: LayerKeep, src: ModelSpec, hk) -> tuple[Index, ...]:
    if leaf.startswith("norm."):
        return (hk,)
    leaf = leaf[len("mixer."):]
    if keep.kind == "attention":
        return _attention(leaf, keep, src, hk)
    if keep.kind == "mlp":
        return _mlp(leaf, _idx(keep.units), hk)
    if keep.kind == "mamba":
        return _mamba(leaf, keep, src, hk)
    return _moe(leaf, keep, hk)


def slice_state_dict(state: Mapping[str, torch.Tensor], source: ModelSpec, plan: PrunePlan) -> dict[str, torch.Tensor]:
    """The pruned model's state dict (reference-model names) from the source model's."""
    hk = _idx(plan.hidden)
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
