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

from plait.ir import kinds
from plait.ir.errors import PlaitError
from plait.ir.job import MoEOptions, document_mask_problem
from plait.ir.model import ModelSpec

from .modules.model import CausalLM, MixerOptions
from .modules.norms import GatedRMSNorm, RMSNorm

INIT_STD = 0.02
# Projections that write into the residual stream get Megatron's depth-scaled init.
OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "out_proj", "w_down")
NORMS = (RMSNorm, GatedRMSNorm, nn.LayerNorm)


def build_model(spec: ModelSpec, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0,
                moe_options: Optional[MoEOptions] = None, capacity_segments: int = 1,
                capacity_cp: int = 1, document_mask: bool = False,
                loss_mask: bool = False) -> CausalLM:
    """The reference model of ``spec``. ``moe_options`` (capacity factor, drop policy) only matter
    for MoE layers (default: dropless); with a capacity factor, ``capacity_segments`` sequence
    chunks each get their own capacity (the tokens one SP / CP rank routes), taken in the zigzag
    order of ``capacity_cp`` context-parallel ranks (`routing.capacity_keep_segments`).
    ``document_mask`` / ``loss_mask``: see CausalLM (packed documents, SFT loss masks)."""
    if document_mask:
        check_document_mask(spec)
    options = MixerOptions(moe_options or MoEOptions(), capacity_segments, capacity_cp)
    mixers = [_mixer(spec, i, options) for i in range(spec.num_layers)]
    model = CausalLM(spec, mixers, document_mask=document_mask, loss_mask=loss_mask)
    init_weights(model, seed)
    _cast(model, dtype, device)
    return model


def check_document_mask(spec: ModelSpec) -> None:
    problem = document_mask_problem(spec)
    if problem:
        raise PlaitError(problem, hint="train it with document_mask = false (documents packed "
                         "with EOS between them)")


def _mixer(spec: ModelSpec, layer: int, options: MixerOptions) -> nn.Module:
    """Layer ``layer``'s reference mixer, built by its kind's module facet."""
    kind = spec.layers[layer]
    try:
        block = spec.layer_block(layer)
    except KeyError as e:
        raise PlaitError(f"model {spec.name!r} uses {kind!r} layers but defines no {kind} block") from e
    try:
        facet = kinds.facet(kind, "module")
    except KeyError:
        raise PlaitError(f"unknown block kind {kind!r}") from None
    return facet.mixer(spec, block, options)


def _cast(model: nn.Module, dtype: torch.dtype, device) -> None:
    """Move to ``device`` and ``dtype``, except the tensors a module lists in ``fp32_params`` (the
    MoE router and expert bias, RoPE frequencies, Mamba's A_log / D / dt_bias): they stay at least
    fp32 in a bf16 / fp16 model (fp64 in a fp64 one), converted from their fp32 originals."""
    keep = []
    for module in model.modules():
        for name in getattr(module, "fp32_params", ()):
            owner, _, leaf = name.rpartition(".")
            holder = module.get_submodule(owner) if owner else module
            if getattr(holder, leaf, None) is not None:
                keep.append((holder, leaf, getattr(holder, leaf).data))
    model.to(device=device, dtype=dtype)
    for holder, leaf, original in keep:
        getattr(holder, leaf).data = original.to(device=device, dtype=torch.promote_types(dtype, torch.float32))


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
