"""The attention kind's reference torch module (lowering/build.py asks every kind the same).

The module facet protocol, mirrored by every kind's ``module.py``:

    mixer(spec, block, options) -> nn.Module
        the single-device reference mixer of one layer of this kind: ``spec`` the ModelSpec,
        ``block`` its block spec (``spec.layer_block(i)``), ``options`` the job's MixerOptions
    traced_whole() -> tuple[type, ...]
        mixer classes torch.fx keeps as one call_module node whose output has its input's shape
        (data-dependent control flow that can be neither traced nor fake-run node by node)
"""
from __future__ import annotations

from torch import nn

from plait.ir.model import Attention, ModelSpec
from plait.kinds import absent
from plait.lowering.modules.attention import SelfAttention
from plait.lowering.modules.model import MixerOptions

from .latent_module import LatentAttention


def mixer(spec: ModelSpec, block: Attention, options: MixerOptions) -> nn.Module:
    """GQA (with its sliding window, if any), or multi-head latent attention when ``latent`` is set."""
    attention = SelfAttention if block.latent is None else LatentAttention
    return attention(block, spec.hidden, spec.norm.eps, spec.max_seq)


traced_whole = absent.no_traced_whole
