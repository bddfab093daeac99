"""The mlp kind's reference torch module (protocol: plait/kinds/attention/module.py)."""
from __future__ import annotations

from torch import nn

from plait.ir.model import MLP, ModelSpec
from plait.kinds import absent
from plait.lowering.modules.mlp import FeedForward
from plait.lowering.modules.model import MixerOptions


def mixer(spec: ModelSpec, block: MLP, options: MixerOptions) -> nn.Module:
    return FeedForward.from_spec(block, spec.hidden)


traced_whole = absent.no_traced_whole
