"""Rotary position embeddings: inverse frequencies (plain, linear, YaRN, Llama 3) and their
application in the rotate-half convention used by Llama / Qwen checkpoints.

The frequency formulas follow the published definitions (YaRN: Peng et al. 2023, Llama 3: Meta's
release); they are computed once per attention layer into a non-persistent buffer ``inv_freq`` plus a
python float ``attention_scaling`` (YaRN's mscale, 1.0 otherwise) that multiplies cos and sin.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from plait.ir.model import Rope, RopeScaling

from .norms import upcast


def _plain_inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _yarn_inv_freq(dim: int, theta: float, s: RopeScaling, original: int) -> tuple[torch.Tensor, float]:
    # Dimensions that rotate fewer than beta_slow times over the original context are interpolated
    # (divided by factor), those rotating more than beta_fast times are kept, a linear ramp between.
    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # weight of the extrapolated (unscaled) frequency
    base = _plain_inv_freq(dim, theta)
    inv_freq = (base / s.factor) * (1 - keep) + base * keep
    if s.mscale and s.mscale_all_dim:  # DeepSeek's pair of magnitude terms (transformers' rule)
        return inv_freq, yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
    return inv_freq, yarn_mscale(s.factor)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _llama3_inv_freq(dim: int, theta: float, s: RopeScaling, original: int) -> torch.Tensor:
    inv_freq = _plain_inv_freq(dim, theta)
    low_wavelen = original / s.low_freq_factor
    high_wavelen = original / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_inv_freq(rope: Rope, head_dim: int, max_seq: Optional[int]) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] fp32, attention_scaling) for a rope spec."""
    s = rope.scaling
    if s is None:
        return _plain_inv_freq(head_dim, rope.theta), 1.0
    if s.kind == "linear":
        return _plain_inv_freq(head_dim, rope.theta) / s.factor, 1.0
    original = s.original_max_positions or max_seq
    if original is None:
        raise ValueError(f"{s.kind} rope scaling needs original_max_positions (or the model's max_seq)")
    if s.kind == "yarn":
        return _yarn_inv_freq(head_dim, rope.theta, s, original)
    if s.kind == "llama3":
        return _llama3_inv_freq(head_dim, rope.theta, s, original), 1.0
    raise ValueError(f"unknown rope scaling {s.kind!r}")


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [s, head_dim] for positions [s] (or [b, s, head_dim] for per-row positions
    [b, s]: packed documents), the half-frequencies repeated (rotate-half layout)."""
    inv_freq = upcast(inv_freq)  # fp32 (fp64 in a float64 model), never the model's bf16
    freqs = positions.to(inv_freq.dtype).unsqueeze(-1) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [b, s, heads, head_dim]; cos/sin: [s, head_dim] or [b, s, head_dim]."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos + rotate_half(x) * sin
