"""The mlp kind's sharding plan (protocol: plait/kinds/attention/parallelize.py): Megatron's
column-parallel gate / up and row-parallel down projection; every op is per token, so CP needs
nothing of it."""
from __future__ import annotations

from plait.ir.model import ModelSpec
from plait.ir.plan import Layout
from plait.lowering.shard_plans import SequenceOp, TensorParallelPlan

PLAN = TensorParallelPlan(column=("gate_proj", "up_proj"), row=("down_proj",))


def tensor_parallel(spec: ModelSpec) -> TensorParallelPlan:
    return PLAN


def tp_sizes(spec: ModelSpec) -> dict[str, int]:
    return {"ffn": spec.mlp.ffn}


def sequence_ops() -> tuple[SequenceOp, ...]:
    return ()


def check_context_parallel(spec: ModelSpec, layout: Layout, seq_len: int) -> None:
    return None


def routed_experts() -> bool:
    return False
