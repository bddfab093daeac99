"""The mamba kind's structured-pruning hooks (protocol: plait/kinds/attention/prune.py): heads,
kept in equal numbers in every group, and the head channels (one ranking shared by all heads), both
scored on the x segment of in_proj's output. Groups and state are never pruned."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from plait.ir.model import Mamba2, ModelSpec
from plait.ir.plan import LayerKeep
from plait.kinds import absent

from .layout import mamba_inner

HEADS, HEAD_DIM = "mamba_heads", "mamba_head_dim"  # the dsl facet's PRUNE_AXES


def axis_groups(model: ModelSpec, axis: str) -> int:
    return model.block("mamba").groups if axis == HEADS else 1


def axis_step(model: ModelSpec, axis: str) -> Optional[int]:
    return model.block("mamba").groups if axis == HEADS else None


def structure_hint(model: ModelSpec, axis: str) -> Optional[str]:
    if axis == HEADS:
        return f"mamba heads come in multiples of the groups ({model.block('mamba').groups})"
    return None


def layout_divisors() -> dict[str, str]:
    return {HEADS: "tp"}


def narrowed(block: Mamba2, widths: dict[str, int]) -> Mamba2:
    if HEADS not in widths and HEAD_DIM not in widths:
        return block
    return replace(block, heads=widths.get(HEADS, block.heads), head_dim=widths.get(HEAD_DIM, block.head_dim))


check_prunable = absent.no_prune_checks


def importance_hooks(mixer) -> tuple:
    """The x segment of in_proj's output, [b, s, heads, head_dim]: L2 over a head's channels
    scores the head, L2 over the heads scores a channel."""
    def measure(args, out):
        d_inner = mixer.out_proj.weight.shape[1]
        x = out[..., d_inner:2 * d_inner].unflatten(-1, (-1, mixer.head_dim))
        return {"units": x.norm(dim=-1), "channels": x.norm(dim=-2)}
    return ((mixer.in_proj, "output", measure),)


def magnitude(mixer) -> tuple:
    """z and x rows of in_proj and out_proj columns, per (head, channel), summed both ways."""
    d_inner, p = mixer.out_proj.weight.shape[1], mixer.head_dim
    heads = d_inner // p
    w = mixer.in_proj.weight.double()
    zx = w[:d_inner].square().sum(dim=1) + w[d_inner:2 * d_inner].square().sum(dim=1)
    zx = zx + mixer.out_proj.weight.double().square().sum(dim=0)  # [d_inner] per (head, channel)
    per = zx.reshape(heads, p)
    return per.sum(dim=1), per.sum(dim=0)


def slice_index(leaf: str, keep: LayerKeep, source: ModelSpec, hidden: list[int]) -> tuple:
    """in_proj's z and x rows of the kept (head, channel) pairs and the kept heads' dt rows, the
    conv channels of x, the gated norm, out_proj columns, per-head A_log, D, dt_bias; B and C
    (groups x state) whole."""
    m = source.block("mamba")
    inner = mamba_inner(keep, m.head_dim)
    bc = list(range(m.d_inner, m.d_inner + 2 * m.groups * m.state))
    conv = inner + bc
    rows = (inner + [m.d_inner + i for i in inner] + [m.d_inner + b for b in bc]
            + [m.d_inner + m.conv_channels + h for h in keep.units])
    heads = list(keep.units)
    table = {"in_proj.weight": (rows, hidden), "in_proj.bias": (rows,), "conv1d.weight": (conv,),
             "conv1d.bias": (conv,), "dt_bias": (heads,), "A_log": (heads,), "D": (heads,),
             "norm.weight": (inner,), "out_proj.weight": (hidden, inner), "out_proj.bias": (hidden,)}
    return table[leaf]
