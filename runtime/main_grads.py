"""fp32 main gradients for low-precision (bf16 / fp8) parameters, as Megatron-Core keeps them.

Each parameter's gradient is added into an fp32 buffer as soon as autograd has accumulated it
(a post-accumulate-grad hook), and the bf16 gradient is dropped: micro-batches accumulate in fp32
and the data-parallel reduction runs on fp32. Each micro-batch's gradient is added times
``scale`` = 1 / micro-batches: the step runner and the pipeline schedules divide the gradients
they find in ``p.grad`` after the last micro-batch, and here they find none. ZeRO-1 hands in views of one flat buffer per
parameter group, so its reduce-scatter writes the rank's shard in place (no second gradient
tensor); plain DP gives each parameter its own buffer.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class MainGrads:
    def __init__(self, named: dict[str, nn.Parameter], buffers: dict[str, torch.Tensor],
                 scale: float = 1.0):
        self.buffers, self.scale = buffers, scale
        self.touched: set[str] = set()
        for name, p in named.items():
            p.register_post_accumulate_grad_hook(self._accumulate_into(name))

    def _accumulate_into(self, name: str):
        def hook(p: torch.Tensor) -> None:
            self.buffers[name].add_(p.grad, alpha=self.scale)  # upcast to fp32, then scaled
            p.grad = None
            self.touched.add(name)
        return hook

    def get(self, name: str) -> Optional[torch.Tensor]:
        """The accumulated fp32 gradient, None when the parameter took no part in the loss."""
        return self.buffers[name] if name in self.touched else None

    def ensure(self, name: str) -> torch.Tensor:
        """The gradient, zeros if nothing was accumulated (a tied copy that must still reduce)."""
        self.touched.add(name)
        return self.buffers[name]

    def zero(self) -> None:
        for name in self.touched:
            self.buffers[name].zero_()
        self.touched.clear()


def own_buffers(named: dict[str, nn.Parameter], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {n: torch.zeros(p.shape, dtype=dtype, device=p.device) for n, p in named.items()}


def masters_of(named: dict[str, nn.Parameter], dtype: torch.dtype) -> dict[str, nn.Parameter]:
    """fp32 main weights: copies of the low-precision parameters the optimizer steps."""
    return {n: nn.Parameter(p.detach().to(dtype).clone()) for n, p in named.items()}


@torch.no_grad()
def publish(masters: dict[str, nn.Parameter], named: dict[str, nn.Parameter]) -> None:
    """Write the updated main weights back into the model's (bf16) parameters."""
    for name, master in masters.items():
        named[name].copy_(master)
