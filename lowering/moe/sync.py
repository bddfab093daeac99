"""What the runtime must know about expert parameters after lowering (``gm.meta["plait.experts"]``).

Expert weights are sharded over EP x ETP and replicated over EDP: their gradients are summed over
the EDP group and scaled by 1 / (dp * cp), as Megatron-Core's DDP does (each EDP replica holds the
gradient of every token routed to its experts from its EP x ETP group; the dense loss is an average
over the dp * cp replicas). Every other parameter is dense and follows the dense rules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .dispatch import ExpertGrid

EXPERTS = "plait.experts"


@dataclass(frozen=True)
class ExpertSync:
    params: tuple[str, ...] = ()  # reference names of this rank's expert parameters
    grid: Optional[ExpertGrid] = None  # this rank's EP x ETP coordinates
    edp: int = 1
    dp_cp: int = 1  # gradient scale 1 / dp_cp after the EDP sum
    gated: bool = True  # w_gate_up holds gate rows then up rows (sliced alike over ETP)
    axis: str = "edp"

    @property
    def scale(self) -> float:
        return 1.0 / self.dp_cp

    def describe(self) -> str:
        if not self.params:
            return "no expert parameters"
        g = self.grid
        return (f"{len(self.params)} expert tensors (ep {g.ep_rank}/{g.ep}, etp {g.etp_rank}/{g.etp}): "
                f"sum over EDP ({self.edp}) then x 1/{self.dp_cp}")

    def slices(self, name: str, full: tuple[int, ...]) -> tuple:
        """This rank's index into the full expert tensor ``name`` of shape ``full``: its experts
        along dim 0, its FFN columns (gated: the same columns of the gate and of the up half, a
        list of two slices) -- the form the weight loader reads."""
        return expert_slices(self.grid, name, full, self.gated)

    def assemble(self, name: str, pieces: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
        """The full reference tensor from every (ep_rank, etp_rank) piece of expert param ``name``
        (inverse of `plait.lowering.moe.shard_experts`)."""
        ep, etp = self.grid.ep, self.grid.etp
        per_expert = []
        for e in range(ep):
            parts = [pieces[(e, r)] for r in range(etp)]
            if name.endswith("w_down"):
                per_expert.append(torch.cat(parts, dim=2))
            elif self.gated:
                halves = [p.chunk(2, dim=1) for p in parts]
                per_expert.append(torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=1))
            else:
                per_expert.append(torch.cat(parts, dim=1))
        return torch.cat(per_expert, dim=0)


def expert_slices(grid: ExpertGrid, name: str, full: tuple[int, ...], gated: bool) -> tuple:
    """See `ExpertSync.slices`; w_gate_up is [E, 2F | F, H], w_down [E, H, F]."""
    experts = slice(grid.first_expert, grid.first_expert + grid.local_experts)

    def cols(start: int, size: int) -> slice:
        part = size // grid.etp
        return slice(start + grid.etp_rank * part, start + (grid.etp_rank + 1) * part)
    if name.endswith("w_down"):
        return (experts, slice(None), cols(0, full[2]))
    if gated:
        half = full[1] // 2
        return (experts, [cols(0, half), cols(half, half)])
    return (experts, cols(0, full[1]))


def take(full: torch.Tensor, index: tuple) -> torch.Tensor:
    """``full[index]`` where an entry may be a list of slices (their pieces concatenated)."""
    for d, entry in enumerate(index):
        if isinstance(entry, list):
            return torch.cat([take(full, index[:d] + (s,) + index[d + 1:]) for s in entry], dim=d)
    return full[index]
