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
