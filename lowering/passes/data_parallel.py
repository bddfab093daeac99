"""Data-parallel gradient handling: decide, per parameter, which reductions its gradient needs
after backward, and record it for the runtime (`gm.meta["plait.grad_sync"]`).

- every gradient is averaged over the DP x CP group (context-parallel ranks see different tokens
  of the same sequences, so they reduce like data-parallel ones): all-reduce (replicated), reduce-scatter into the
  owner's shard (zero1, distributed optimizer) or FSDP's own reduce-scatter (fsdp);
- a replicated parameter used inside a TP region or a sequence-parallel region holds only this
  rank's share of its gradient: it is also summed over TP (found from the sharding states).
The runtime executes these reductions; it decides nothing itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx

from plait.ir.errors import LayoutError
from plait.ir.plan import DP_KINDS
from plait.lowering import sharding
from plait.lowering.moe.sync import EXPERTS, ExpertSync

from .base import Pass, Target, VerifyError
from .shard_tensor_parallel import SHARDS

GRAD_SYNC = "plait.grad_sync"


@dataclass(frozen=True)
class GradSync:
    dp_kind: str  # replicated | zero1 | fsdp
    dp: int
    cp: int = 1
    tp_sum: tuple[str, ...] = ()  # parameters whose gradients are summed over TP first
    # tied embedding copies on the first and last pipeline stage: gradients summed over the
    # "embedding" group (split_pipeline fills it in)
    embedding_sum: tuple[str, ...] = ()

    def describe(self, names=None) -> str:
        """One line; ``names`` limits the TP-sum list to those parameters (one stage's)."""
        how = {"replicated": "all-reduce", "zero1": "reduce-scatter to optimizer shards",
               "fsdp": "FSDP reduce-scatter"}[self.dp_kind]
        group = f"dp{self.dp} x cp{self.cp}: average gradients over DP x CP" if self.cp > 1 else \
            f"dp{self.dp}: average gradients over DP"
        text = f"{group} ({how})"
        tp_sum = [n for n in self.tp_sum if names is None or n in names]
        if tp_sum:
            text += f"; sum over TP first: {', '.join(tp_sum)}"
        tied = [n for n in self.embedding_sum if names is None or n in names]
        if tied:
            text += f"; sum over the embedding group (first + last stage copies): {', '.join(tied)}"
        return text


def data_parallel(gm: torch.fx.GraphModule, t: Target) -> torch.fx.GraphModule:
    kind = t.layout.dp_kind
    if kind not in DP_KINDS:
        raise LayoutError(f"unknown dp_kind {kind!r}; expected one of {', '.join(DP_KINDS)}")
    tp_sum: tuple[str, ...] = ()
    if t.layout.tp > 1:
        states = sharding.propagate(gm)
        # expert weights (dispatch_experts) are sharded over EP x ETP and reduce over EDP only
        not_replicated = set(gm.meta.get(SHARDS, {})) | set(gm.meta.get(EXPERTS, ExpertSync()).params)
        tp_sum = tuple(sharding.partial_grad_params(gm, states, not_replicated))
    gm.meta[GRAD_SYNC] = GradSync(dp_kind=kind, dp=t.layout.dp, cp=t.layout.cp, tp_sum=tp_sum)
    return gm


def verify_data_parallel(gm: torch.fx.GraphModule, t: Target) -> None:
    sync: GradSync = gm.meta[GRAD_SYNC]
    params = dict(gm.named_parameters())
    shards = gm.meta.get(SHARDS, {})
    for name in sync.tp_sum:
        if name not in params or name in shards:
            raise VerifyError(f"{name}: a TP gradient sum needs a replicated parameter")
    if t.layout.sp and t.layout.tp > 1:
        norms = [n for n in params if n.endswith("norm.weight") and ".mixer." not in n]
        missing = [n for n in norms if n not in sync.tp_sum]
        if missing:
            raise VerifyError(f"under sequence parallelism {missing} see only local tokens but "
                              "their gradients are not summed over TP")


DATA_PARALLEL = Pass(
    name="data_parallel", run=data_parallel, verify=verify_data_parallel,
    requires=("traced",), ensures=("grad-sync",),
    doc="which gradients are averaged over DP and summed over TP")
