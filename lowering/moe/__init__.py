"""Distributed MoE: permutation by expert, token dispatchers (alltoall / allgather, dropless or
capacity-dropping), and the expert-parallel MoE mixer that holds one EP x ETP shard of the experts.
The `dispatch_experts` pass (lowering/passes/) puts it into compiled programs."""
from .dispatch import AllGatherDispatcher, AllToAllDispatcher, ExpertGrid, make_dispatcher
from .layer import EXPERT_PARAMS, ExpertParallelMoE, shard_experts
from .permute import Permutation, drop_over_capacity, permute, unpermute

__all__ = [
    "AllGatherDispatcher", "AllToAllDispatcher", "ExpertGrid", "make_dispatcher", "EXPERT_PARAMS",
    "ExpertParallelMoE", "shard_experts", "Permutation", "drop_over_capacity", "permute", "unpermute",
]
