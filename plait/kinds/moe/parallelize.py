"""The moe kind's sharding plan (protocol: plait/kinds/attention/parallelize.py).

Its routed experts are placed over EP x ETP by the dispatch_experts pass (which runs first and
makes the mixer one expert-parallel module), so TP splits only the shared expert: a dense MLP,
column / row-parallel as Megatron-Core's SharedExpertMLP; the mixer gathers and reduce-scatters
its sequence-parallel tokens around it. The router and the shared expert's gate stay replicated.
Every op is per token: under CP a rank routes its own chunks' tokens.
"""
from __future__ import annotations

from torch import nn

from plait.ir.model import ModelSpec
from plait.kinds import absent
from plait.lowering.moe import ExpertParallelMoE
from plait.lowering.passes.base import VerifyError
from plait.lowering.shard_plans import ShardParam, TensorParallelPlan

SHARED_EXPERT = (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1))  # (linear, split dim)


def _shard_shared_expert(mixer: nn.Module, path: str, shard: ShardParam, group: tuple[str, int]) -> None:
    """An expert-parallel mixer's (at ``path``) shared expert, split over the TP ``group`` (axis, size)."""
    if not isinstance(mixer, ExpertParallelMoE):
        return
    shared = getattr(mixer, "shared", None)
    if shared is None:
        return
    if shared.down_proj.bias is not None:
        raise VerifyError(f"{path}.shared: a row-parallel bias in a shared expert is not lowered")
    for leaf, dim in SHARED_EXPERT:
        if hasattr(shared, leaf):
            shard(f"shared.{leaf}.weight", dim)
            if dim == 0:  # a column-parallel bias splits with its rows
                shard(f"shared.{leaf}.bias", 0)
    mixer.shared_tp = group


PLAN = TensorParallelPlan(whole=_shard_shared_expert)


def tensor_parallel(spec: ModelSpec) -> TensorParallelPlan:
    return PLAN


sequence_ops = absent.no_sequence_ops


def routed_experts() -> bool:
    return True
