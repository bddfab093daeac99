"""MoE cost items against hand computations: dispatcher communication on the real topology
(all-to-all inside a node vs across nodes, the allgather dispatcher), the capacity / dropless load
assumption, permutation memory, expert parameters and optimizer state over EDP."""
from dataclasses import replace

import pytest

from plait.ir import counts
from plait.ir.job import MoEOptions
from plait.ir.plan import Layout
from plait.kinds.moe import cost as moe_cost
from plait.planner.cost import memory
from plait.planner.cost.context import Context

H, TOKENS, TOP_K, BF16 = 6144, 4096, 2, 2  # Mixtral-8x22B, seq 4096, mbs 1
B_IN, B_OUT, A_IN, A_OUT = 450e9 * 0.8, 50e9 * 0.8, 3e-6, 8e-6  # conftest DGX H100, default effs
A2A_EFF = 0.6
# the paper's folding layout: EP8 with ETP1 is the 8 GPUs of one node
FOLDING = Layout(tp=2, dp=8, pp=8, etp=1, ep=8, edp=2, sp=True)
# the paper's TPxEPxDP row: ETP = TP = 4, so EP8 strides 4 ranks and spans 4 nodes (2 per node)
TP_EP_DP = Layout(tp=4, dp=32, pp=1, etp=4, ep=8, edp=4, sp=True)


def moe_job(mixtral_job, **options):
    job = mixtral_job()
    return replace(job, moe=MoEOptions(**options))


# balanced random routing of EP8 x 2048 tokens, top-2 of 8 experts, one expert per rank: the
# busiest rank is Blom's score for 8 draws (1.4342) x sqrt(8 / 7) (the loads sum to a constant)
# standard deviations above the mean 4096
RANDOM = 1 + 1.4342 * (8 / 7) ** 0.5 * (16384 * 2 / 8 * 7 / 8 * 6 / 7) ** 0.5 / 4096


@pytest.mark.parametrize("options, load", [
    ({}, RANDOM),  # dropless: the busiest rank of random routing
    ({"capacity_factor": 1.0}, 1.0),  # capacity caps the busiest expert
    ({"capacity_factor": 1.5}, RANDOM),  # a loose capacity drops nothing: imbalance again
    ({"capacity_factor": 1.5, "pad_to_capacity": True}, 1.5),  # every expert padded to cf
])
def test_expert_load_assumption(mixtral_job, options, load):
    ctx = Context(moe_job(mixtral_job, **options), FOLDING)
    assert moe_cost.expert_load(ctx) == pytest.approx(load, rel=1e-4)
    assert moe_cost.routed_tokens(ctx) == pytest.approx(FOLDING.etp * TOKENS / FOLDING.tp * TOP_K * load,
                                              rel=1e-4)


def test_alltoall_dispatch_inside_a_node_by_hand(mixtral_job):
    ctx = Context(moe_job(mixtral_job), FOLDING)
    g = ctx.group("expert", "ep")
    assert (g.size, g.nodes) == (8, 1)
    sent = TOKENS / 2 * TOP_K * RANDOM * H * BF16  # tokens/tp, k copies, busiest rank, bf16
    # 7 of 8 peers over NVLink, one message each paying the link latency, then one sync
    a2a = 7 * (sent / 8 / (B_IN * A2A_EFF) + A_IN) + A_IN
    assert moe_cost.dispatch_comm(ctx) == pytest.approx(2 * a2a, rel=1e-4)  # ETP1: no gather


def test_alltoall_dispatch_across_nodes_by_hand(mixtral_job):
    ctx = Context(moe_job(mixtral_job, capacity_factor=1.0), TP_EP_DP)
    g = ctx.group("expert", "ep")
    assert (g.size, g.nodes, g.per_node) == (8, 4, 2)
    sent = TOKENS / 4 * TOP_K * 1.0 * H * BF16
    intra = sent / 8 / (B_IN * A2A_EFF) + A_IN  # the one peer on this node
    inter = 6 * (sent / 8 / (B_OUT * A2A_EFF) + A_OUT)  # six peers behind the NIC: the bottleneck
    a2a = max(intra, inter) + A_OUT
    etp = 3 / 4 * (4 * sent) / B_IN + 3 * A_IN  # all-gather-v / reduce-scatter-v over ETP4 (node)
    assert moe_cost.dispatch_comm(ctx) == pytest.approx(2 * a2a + 2 * etp)
    # the same volume inside a node would be ~(450 / 50) x faster on the all-to-all part
    assert (inter - 6 * A_OUT) / (intra - A_IN) == pytest.approx(6 * B_IN / B_OUT)


def test_allgather_dispatcher_moves_every_token_by_hand(mixtral_job):
    lay = replace(FOLDING, dispatcher="allgather")
    ctx = Context(moe_job(mixtral_job), lay)
    full = TOKENS / 2 * 8 * H * BF16  # every rank's tokens gathered over ETP x EP = 8 (one node)
    ring = 7 / 8 * full / B_IN + 7 * A_IN
    assert moe_cost.dispatch_comm(ctx) == pytest.approx(2 * ring)  # all-gather + reduce-scatter


def test_permutation_buffers_by_hand(mixtral_job):
    ctx = Context(moe_job(mixtral_job), FOLDING)
    routed = 1 * TOKENS / 2 * TOP_K * RANDOM  # token copies this rank's experts see
    sp_gather = TOKENS * H * BF16  # the sequence-parallel all-gather output (tp 2)
    send_recv = 2 * routed * H * BF16  # dispatch send + receive buffers of the permuted rows
    assert memory.comm_buffers(ctx, ("attention", "moe")) == pytest.approx(sp_gather + send_recv)
    assert memory.comm_buffers(ctx, ("attention",)) == pytest.approx(sp_gather)


@pytest.mark.parametrize("dp_kind, weight_shards, optimizer_shards", [
    ("zero1", 1, 2), ("fsdp", 2, 2), ("replicated", 1, 1)])
def test_expert_state_is_sharded_over_edp(mixtral_job, dp_kind, weight_shards, optimizer_shards):
    lay = replace(FOLDING, dp_kind=dp_kind)
    ctx = Context(moe_job(mixtral_job), lay)
    dense, expert = memory.block_params_on_rank(ctx, "moe")
    per_rank = counts.expert_params(ctx.model) / (8 * 1)  # EP8 x ETP1 shards the experts
    assert expert == pytest.approx(per_rank)
    state = memory.state_bytes(ctx, 0.0, expert)
    # bf16 weights; FSDP2's mixed precision keeps only the fp32 shards (counted as the master)
    assert state["weights"] == pytest.approx(0 if dp_kind == "fsdp" else per_rank * 2 / weight_shards)
    assert state["optimizer"] == pytest.approx(per_rank * 12 / optimizer_shards)  # fp32 master, m, v
    # dense parameters of the same rank shard over DP x CP = 8, not EDP = 2
    dense_state = memory.state_bytes(ctx, 1.0, 0.0)
    assert dense_state["optimizer"] == pytest.approx(12 / (8 if dp_kind != "replicated" else 1))
