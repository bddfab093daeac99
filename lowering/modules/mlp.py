"""Feed-forward mixer: SwiGLU (gate_proj, up_proj, down_proj) or plain GELU / ReLU² (up_proj,
down_proj). Names follow Llama so the TP pass shards gate/up column-wise and down row-wise."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plait.ir.model import MLP


def relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


def activation_fn(name: str):
    """The elementwise activation of an MLP: silu for swiglu (gated), exact gelu, or relu²."""
    table = {"swiglu": F.silu, "gelu": F.gelu, "relu2": relu2}
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(table)}")
    return table[name]


class FeedForward(nn.Module):
    def __init__(self, hidden: int, ffn: int, activation: str, bias: bool = False):
        super().__init__()
        self.gated = activation == "swiglu"
        self.act = activation_fn(activation)
        if self.gated:
            self.gate_proj = nn.Linear(hidden, ffn, bias=bias)
        self.up_proj = nn.Linear(hidden, ffn, bias=bias)
        self.down_proj = nn.Linear(ffn, hidden, bias=bias)

    @classmethod
    def from_spec(cls, spec: MLP, hidden: int) -> "FeedForward":
        return cls(hidden, spec.ffn, spec.activation, spec.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))
