"""The mamba kind's reference torch module (protocol: plait/kinds/attention/module.py)."""
from __future__ import annotations

from torch import nn

from plait.ir.model import Mamba2, ModelSpec
from plait.kinds import absent
from plait.lowering.modules.mamba import Mamba2Mixer
from plait.lowering.modules.model import MixerOptions


def mixer(spec: ModelSpec, block: Mamba2, options: MixerOptions) -> nn.Module:
    return Mamba2Mixer(block, spec.hidden, spec.norm.eps)


traced_whole = absent.no_traced_whole
