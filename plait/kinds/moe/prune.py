"""The moe kind's structured-pruning hooks (protocol: plait/kinds/attention/prune.py): whole
experts, scored by the mean norm of their output per routed token, sliced from the router, the
expert bias and the stacked expert weights. The shared expert keeps its neurons."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from plait.ir.model import ModelSpec, MoE
from plait.ir.plan import LayerKeep
from plait.kinds import absent
from plait.kinds.mlp.layout import neuron_index  # the shared expert is a dense MLP


axis_groups = absent.one_group
axis_step = absent.no_structural_step


def structure_hint(model: ModelSpec, axis: str) -> Optional[str]:
    return f"experts must stay at least top_k ({model.block('moe').top_k})"


def layout_divisors() -> dict[str, str]:
    return {"experts": "ep"}


def narrowed(block: MoE, widths: dict[str, int]) -> MoE:
    return replace(block, experts=widths["experts"]) if "experts" in widths else block


check_prunable = absent.no_prune_checks


def importance_hooks(mixer) -> tuple:
    """An expert's score: the norms of its outputs summed, with the tokens routed to it."""
    import torch

    def measure(args, out):
        counts = args[1]
        owner = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
        norms = torch.zeros(len(counts), dtype=torch.float64).index_add_(
            0, owner.cpu(), out.norm(dim=-1).double().cpu())
        return {"routed": (norms, counts.double().cpu())}
    return ((mixer.experts, "output", measure),)


def magnitude(mixer) -> tuple:
    e = mixer.experts
    return e.w_gate_up.double().square().sum(dim=(1, 2)) + e.w_down.double().square().sum(dim=(1, 2)), None


def slice_index(leaf: str, keep: LayerKeep, source: ModelSpec, hidden: list[int]) -> tuple:
    experts = list(keep.units)
    if leaf.startswith("shared."):
        return neuron_index(leaf[len("shared."):], None, hidden)
    table = {"router.weight": (experts, hidden), "expert_bias": (experts,), "shared_gate.weight": (None, hidden),
             "experts.w_gate_up": (experts, None, hidden), "experts.w_down": (experts, hidden, None)}
    return table[leaf]
