"""The mlp kind's sharding plan (protocol: plait/kinds/attention/parallelize.py): Megatron's
column-parallel gate / up and row-parallel down projection; every op is per token, so CP needs
nothing of it."""
from __future__ import annotations

from plait.ir.model import ModelSpec
from plait.kinds import absent
from plait.lowering.shard_plans import TensorParallelPlan

PLAN = TensorParallelPlan(column=("gate_proj", "up_proj"), row=("down_proj",))


def tensor_parallel(spec: ModelSpec) -> TensorParallelPlan:
    return PLAN


sequence_ops = absent.no_sequence_ops
routed_experts = absent.no_routed_experts
