"""The moe kind's reference torch module (protocol: plait/kinds/attention/module.py)."""
from __future__ import annotations

from torch import nn

from plait.ir.model import ModelSpec, MoE
from plait.lowering.modules.model import MixerOptions
from plait.lowering.modules.moe import MoEBlock


def mixer(spec: ModelSpec, block: MoE, options: MixerOptions) -> nn.Module:
    """Dropless unless the job sets a capacity factor; capacity then applies per sequence chunk."""
    return MoEBlock(block, spec.hidden, options.moe, options.capacity_segments, options.capacity_cp)


def traced_whole() -> tuple[type, ...]:
    """Routing decides token counts, hence shapes: the mixer stays one node, and the
    dispatch_experts pass replaces it whole."""
    return (MoEBlock,)
