"""The attention kind's structured-pruning hooks: how its prune axis snaps, the importance of its
query heads, and how its weights are sliced (planner/prune and lowering/prune ask every kind the same).

The prune facet protocol, mirrored by every kind's ``prune.py``. Planner side, pure Python (the
planner reads this facet without loading torch; the lowering hooks import what they need on call):

    (the kind's prune axes, and its widths on them, are its dsl facet's PRUNE_AXES and axis_width:
    the first axis narrows its *units*, what LayerScores.units ranks; a second one the channels
    of each unit, LayerScores.channels)

    axis_groups(model, axis) -> int            equal groups an axis's indices are ranked within and
                                               kept equally from (1: one ranking)
    axis_step(model, axis) -> int | None       the structural snapping multiple of the axis (None:
                                               the hardware multiple, planner/prune/widths.py)
    structure_hint(model, axis) -> str | None  what a legal width must respect, for an error's hint
    layout_divisors() -> dict[str, str]        axis -> the parallel size that must divide it
    narrowed(block, widths) -> block           the block at the widths in ``widths`` (axis -> width)
                                               of its own axes, the others kept
    check_prunable(model, layers) -> None      raise PlaitError where this kind cannot be pruned
                                               to the layer sequence ``layers``

Lowering side (torch tensors):

    importance_hooks(mixer) -> tuple[(module, "input" | "output", measure), ...]
        forward hooks of Minitron's activation importance: ``measure(args, out)`` returns
        {"units": [b, s, n]} / {"channels": [b, s, n]} per-token scores (aggregated as mean over
        the sequence, L2 over the batch), or {"routed": (score sums [n], tokens [n])} (a mean over
        the tokens routed to each unit)
    magnitude(mixer) -> (units, channels | None)
        squared L2 norms of the weights that read and write each unit (and channel)
    slice_index(leaf, keep, source, hidden) -> tuple[list[int] | None, ...]
        per dimension of mixer parameter ``leaf``, the source indices a LayerKeep keeps (None:
        the dimension whole); ``hidden`` the kept embedding channels
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from plait.ir.errors import PlaitError
from plait.ir.model import Attention, ModelSpec
from plait.ir.plan import LayerKeep


def axis_groups(model: ModelSpec, axis: str) -> int:
    """Query heads are kept in equal numbers in every KV group (k_proj / v_proj stay whole)."""
    return model.block("attention").kv_heads


def axis_step(model: ModelSpec, axis: str) -> Optional[int]:
    return model.block("attention").kv_heads


def structure_hint(model: ModelSpec, axis: str) -> Optional[str]:
    return f"attention heads come in multiples of kv_heads ({model.block('attention').kv_heads})"


def layout_divisors() -> dict[str, str]:
    return {"attention_heads": "tp"}


def narrowed(block: Attention, widths: dict[str, int]) -> Attention:
    return replace(block, heads=widths["attention_heads"]) if "attention_heads" in widths else block


def check_prunable(model: ModelSpec, layers: tuple[str, ...]) -> None:
    """Scores and slices know GQA's q/k/v projections; one window per layer must survive depth."""
    block = model.block("attention")
    if block.latent is not None:
        raise PlaitError(f"model {model.name!r}: pruning multi-head latent attention models is not supported",
                         hint="its importance scores and weight slicing know GQA's q/k/v projections only")
    if block.full_layers and layers.count("attention") != model.count("attention"):
        raise PlaitError(f"model {model.name!r}: depth pruning of attention layers whose windows "
                         f"differ (full_layers = {list(block.full_layers)}) is not supported",
                         hint="prune attention widths only, or give every attention layer one window")


def importance_hooks(mixer) -> tuple:
    """A query head's score: the L2 norm of its channels at o_proj's input."""
    def measure(args, out):
        return {"units": args[0].unflatten(-1, (-1, mixer.head_dim)).norm(dim=-1)}
    return ((mixer.o_proj, "input", measure),)


def magnitude(mixer) -> tuple:
    from plait.lowering.prune.importance import col_squares, row_squares
    heads = mixer.q_proj.weight.shape[0] // mixer.head_dim
    return row_squares(mixer.q_proj.weight, heads) + col_squares(mixer.o_proj.weight, heads), None


def slice_index(leaf: str, keep: LayerKeep, source: ModelSpec, hidden: list[int]) -> tuple:
    """q_proj rows and o_proj columns of the kept query heads; k / v / their biases, q / k norms whole."""
    hd = source.block("attention").head_dim
    heads = [h * hd + c for h in keep.units for c in range(hd)]
    table = {"q_proj.weight": (heads, hidden), "q_proj.bias": (heads,), "k_proj.weight": (None, hidden),
             "v_proj.weight": (None, hidden), "o_proj.weight": (hidden, heads), "o_proj.bias": (hidden,)}
    return table.get(leaf, (None,))
