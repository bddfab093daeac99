"""The Mamba2 mixer (Megatron / Nemotron-H layout):

    in_proj -> [z, x, B, C, dt];  xBC -> depthwise causal conv1d -> silu;
    dt <- max(softplus(dt + dt_bias), dt_min);  A = -exp(A_log);  y = SSD(x, dt, A, B, C) + D * x;
    y <- gated RMSNorm(y, z) over groups of d_inner / groups channels;  out_proj(y)

TP-friendly: the split sizes are read from the parameters (d_inner from out_proj, heads from
A_log, conv channels from conv1d), so a pass that shards z / x / B / C / dt column-wise, the conv
channels, A_log / D / dt_bias per head and out_proj row-wise needs no other rewrite. The conv and
the scan are one fx node each (``causal_conv1d``, ``ssd_scan``): the seams the kernel registry and
a context-parallel pass replace.
"""
from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from plait.ir.model import Mamba2

from . import ssd
from .norms import GatedRMSNorm, upcast


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """x [b, s, c] -> silu(depthwise causal conv) [b, s, c]; weight [c, 1, k]."""
    k = weight.shape[-1]
    out = F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), weight, bias, groups=weight.shape[0])
    return F.silu(out).transpose(1, 2)


def ssd_scan(x, dt, A, B, C, chunk: int):
    return ssd.ssd_chunked_recomputed(x, dt, A, B, C, chunk)


torch.fx.wrap("causal_conv1d")
torch.fx.wrap("ssd_scan")


class Mamba2Mixer(nn.Module):
    fp32_params = ("A_log", "D", "dt_bias")

    def __init__(self, spec: Mamba2, hidden: int, norm_eps: float):
        super().__init__()
        self.head_dim, self.state, self.chunk = spec.head_dim, spec.state, spec.chunk
        self.dt_min = spec.dt_min
        self.in_proj = nn.Linear(hidden, spec.in_proj_out, bias=spec.proj_bias)
        self.conv1d = nn.Conv1d(spec.conv_channels, spec.conv_channels, spec.conv, groups=spec.conv_channels,
                                padding=spec.conv - 1, bias=spec.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(spec.heads))
        self.A_log = nn.Parameter(torch.empty(spec.heads))
        self.D = nn.Parameter(torch.empty(spec.heads))
        self.norm = GatedRMSNorm(spec.d_inner, spec.d_inner // spec.groups, norm_eps)
        self.out_proj = nn.Linear(spec.d_inner, hidden, bias=spec.proj_bias)

    @torch.no_grad()
    def reset_parameters_with(self, gen: torch.Generator) -> None:
        """Mamba2's init for the SSM parameters (the linears, conv and norm get the model's):
        A in U[1, 16], D = 1, dt_bias = softplus^-1(dt) for dt log-uniform in [1e-3, 1e-1]."""
        heads = self.A_log.shape[0]
        self.A_log.copy_(torch.log(torch.rand(heads, generator=gen) * 15 + 1))
        self.D.fill_(1.0)
        dt = torch.exp(torch.rand(heads, generator=gen) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt = dt.clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s = x.shape[0], x.shape[1]
        d_inner, channels = self.out_proj.weight.shape[1], self.conv1d.weight.shape[0]
        zxbcdt = self.in_proj(x)  # slices, not torch.split: split sizes that are fx proxies do not unpack
        z, xbc, dt = zxbcdt[..., :d_inner], zxbcdt[..., d_inner:d_inner + channels], zxbcdt[..., d_inner + channels:]
        xbc = causal_conv1d(xbc, self.conv1d.weight, self.conv1d.bias)
        bc = (channels - d_inner) // 2
        xs, B, C = xbc[..., :d_inner], xbc[..., d_inner:d_inner + bc], xbc[..., d_inner + bc:]
        dt = F.softplus(upcast(dt) + self.dt_bias)
        if self.dt_min > 0:  # a constant in the traced graph; elementwise, so TP/CP shards need nothing
            dt = dt.clamp(min=self.dt_min)
        A = -torch.exp(upcast(self.A_log))
        xs = xs.reshape(b, s, -1, self.head_dim)
        y = ssd_scan(xs, dt, A, B.reshape(b, s, -1, self.state), C.reshape(b, s, -1, self.state), self.chunk)
        y = y + upcast(xs) * upcast(self.D)[:, None]
        y = self.norm(y.reshape(b, s, -1).to(x.dtype), z)
        return self.out_proj(y)
