"""IR -> the single-device reference ``torch.nn.Module`` (contract C4), the numerical ground truth
that every compiled / distributed program must reproduce.

    m = build_model(spec, dtype=torch.float32, device="cpu", seed=0)
    loss = m(tokens, labels)      # mean cross-entropy
    logits = m(tokens)            # [batch, seq, vocab]

Initialisation is deterministic in ``seed`` and independent of the device and of torch's global RNG:
every tensor is drawn on the CPU from one generator in parameter order, then copied.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from plait.ir.errors import PlaitError
from plait.ir.job import MoEOptions
from plait.ir.model import ModelSpec

from .modules.attention import SelfAttention
from .modules.mlp import FeedForward
from .modules.model import CausalLM
from .modules.norms import GatedRMSNorm, RMSNorm, upcast

INIT_STD = 0.02
# Projections that write into the residual stream get Megatron's depth-scaled init.
OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "out_proj", "w_down")
NORMS = (RMSNorm, GatedRMSNorm, nn.LayerNorm)


def build_model(spec: ModelSpec, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0,
                moe_options: Optional[MoEOptions] = None, capacity_segments: int = 1) -> CausalLM:
    """The reference model of ``spec``. ``moe_options`` (capacity factor, drop policy) only matter
    for MoE layers (default: dropless); with a capacity factor, ``capacity_segments`` sequence
    chunks each get their own capacity (the tokens one SP / CP rank routes)."""
    mixers = [_mixer(spec, kind, moe_options, capacity_segments) for kind in spec.layers]
    model = CausalLM(spec, mixers)
    init_weights(model, seed)
    model.to(device=device, dtype=dtype)
    _keep_fp32(model)
    return model


def _mixer(spec: ModelSpec, kind: str, moe_options: Optional[MoEOptions], segments: int) -> nn.Module:
    try:
        block = spec.block(kind)
    except KeyError as e:
        raise PlaitError(f"model {spec.name!r} uses {kind!r} layers but defines no {kind} block") from e
    if kind == "attention":
        return SelfAttention(block, spec.hidden, spec.norm.eps, spec.max_seq)
    if kind == "mlp":
        return FeedForward.from_spec(block, spec.hidden)
    if kind == "moe":
        from .modules.moe import MoEBlock
        return MoEBlock(block, spec.hidden, moe_options or MoEOptions(), segments)
    if kind == "mamba":
        from .modules.mamba import Mamba2Mixer
        return Mamba2Mixer(block, spec.hidden, spec.norm.eps)
    raise PlaitError(f"unknown block kind {kind!r}")


def _keep_fp32(model: nn.Module) -> None:
    """Tensors a module lists in ``fp32_params`` (the MoE router and expert bias, RoPE frequencies,
    Mamba's A_log / D / dt_bias) stay at least fp32 in a bf16 / fp16 model (fp64 stays fp64)."""
    for module in model.modules():
        for name in getattr(module, "fp32_params", ()):
            owner, _, leaf = name.rpartition(".")
            holder = module.get_submodule(owner) if owner else module
            tensor = getattr(holder, leaf, None)
            if tensor is not None:
                tensor.data = upcast(tensor.data)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    depth_std = INIT_STD / math.sqrt(2 * max(1, len(getattr(model, "layers", ()))))
    for module_name, module in model.named_modules():
        custom = getattr(module, "reset_parameters_with", None)
        if custom is not None:
            custom(gen)  # the module's own parameters (Mamba's A_log, dt_bias, D); children below
            continue
        for name, p in module.named_parameters(recurse=False):
            p.copy_(_draw(module, module_name, name, p, gen, depth_std))


def _draw(module: nn.Module, module_name: str, name: str, p: torch.Tensor, gen: torch.Generator,
          depth_std: float) -> torch.Tensor:
    if name == "bias":
        return torch.zeros(p.shape)
    if isinstance(module, NORMS):
        return torch.ones(p.shape)
    leaf = module_name.rsplit(".", 1)[-1]
    std = depth_std if (leaf in OUTPUT_PROJECTIONS or name in OUTPUT_PROJECTIONS) else INIT_STD
    return torch.randn(p.shape, generator=gen) * std
