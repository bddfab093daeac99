"""The mlp kind's structured-pruning hooks (protocol: plait/kinds/attention/prune.py): its ffn
neurons, scored at down_proj's input and sliced from gate / up rows and down columns."""
from __future__ import annotations

from dataclasses import replace

from plait.ir.model import MLP, ModelSpec
from plait.ir.plan import LayerKeep
from plait.kinds import absent

from .layout import neuron_index


axis_groups = absent.one_group
axis_step = absent.no_structural_step
structure_hint = absent.no_structure_hint


def layout_divisors() -> dict[str, str]:
    return {"ffn": "tp"}


def narrowed(block: MLP, widths: dict[str, int]) -> MLP:
    return replace(block, ffn=widths["ffn"]) if "ffn" in widths else block


check_prunable = absent.no_prune_checks


def importance_hooks(mixer) -> tuple:
    """A neuron's score: its activation at down_proj's input."""
    return ((mixer.down_proj, "input", lambda args, out: {"units": args[0].abs()}),)


def magnitude(mixer) -> tuple:
    from plait.lowering.prune.importance import col_squares, row_squares
    up, down = mixer.up_proj.weight, mixer.down_proj.weight
    units = row_squares(up, up.shape[0]) + col_squares(down, down.shape[1])
    if mixer.gated:
        units = units + row_squares(mixer.gate_proj.weight, mixer.gate_proj.weight.shape[0])
    return units, None


def slice_index(leaf: str, keep: LayerKeep, source: ModelSpec, hidden: list[int]) -> tuple:
    return neuron_index(leaf, list(keep.units), hidden)
