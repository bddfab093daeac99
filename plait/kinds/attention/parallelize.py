"""The attention kind's sharding plan for the lowering passes (TP / SP / CP), stated as data that
the generic passes apply (lowering/shard_plans.py). What a layout must satisfy (heads divisible by
tp, the all-to-all head split) is this kind's rules facet (rules.py), which the passes ask first.

The parallelize facet protocol, mirrored by every kind's ``parallelize.py``:

    tensor_parallel(spec) -> TensorParallelPlan
        which leaf linears of the mixer are column- / row-parallel (and what else TP splits)
    sequence_ops() -> tuple[SequenceOp, ...]
        the reference ops that read along the whole sequence, and their CP-aware replacements
    routed_experts() -> bool
        the mixer routes tokens to experts: dispatch_experts places it over EP x ETP
"""
from __future__ import annotations

from plait.ir.model import ModelSpec
from plait.ir.plan import CP_COMMS
from plait.kinds import absent
from plait.lowering.cp_attention import ring_attention, ulysses_attention
from plait.lowering.cp_documents import ring_document_attention, ulysses_document_attention
from plait.lowering.cp_ops import zigzag_positions
from plait.lowering.modules import attention as reference
from plait.lowering.shard_plans import SequenceOp, TensorParallelPlan

# q_b_proj / kv_b_proj: multi-head latent attention's per-head up-projections (split by heads, as
# Megatron-Core's MLA does); its latent down-projections q_a_proj / kv_a_proj_with_mqa and their
# norms stay replicated, their gradients summed over TP (sharding.partial_grad_params).
PLAN = TensorParallelPlan(column=("q_proj", "k_proj", "v_proj", "q_b_proj", "kv_b_proj"), row=("o_proj",))
SEQUENCE_OPS = (
    SequenceOp(reference.sequence_positions, dict.fromkeys(CP_COMMS, zigzag_positions), communicates=False),
    SequenceOp(reference.causal_attention, {"ring": ring_attention, "alltoall": ulysses_attention}),
    SequenceOp(reference.document_attention,
               {"ring": ring_document_attention, "alltoall": ulysses_document_attention}),
)


def tensor_parallel(spec: ModelSpec) -> TensorParallelPlan:
    return PLAN


def sequence_ops() -> tuple[SequenceOp, ...]:
    return SEQUENCE_OPS


routed_experts = absent.no_routed_experts
