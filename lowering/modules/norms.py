"""Normalisation layers of the reference model.

RMSNorm computes in fp32 and casts back before the weight multiply (as Hugging Face Llama does), so
bf16 runs match the published implementations; in fp32 the cast is a no-op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plait.ir.model import Norm


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16 / fp16 -> fp32; fp64 stays fp64, so a float64 reference stays exact)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = upcast(x)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GatedRMSNorm(nn.Module):
    """Mamba2's gated RMSNorm: ``rmsnorm(y * silu(z))`` normalised over groups of ``group_size``
    channels (group size d_inner / groups, so each TP rank normalises only its own groups)."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        y = upcast(y) * F.silu(upcast(z))
        grouped = y.unflatten(-1, (-1, self.group_size))
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * grouped.flatten(-2).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, group_size={self.group_size}, eps={self.eps}"


def make_norm(spec: Norm, dim: int) -> nn.Module:
    if spec.kind == "rmsnorm":
        return RMSNorm(dim, spec.eps)
    if spec.kind == "layernorm":
        return nn.LayerNorm(dim, eps=spec.eps)
    raise ValueError(f"unknown norm kind {spec.kind!r}")
