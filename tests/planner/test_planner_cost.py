"""Cost-model terms against hand computations and ir/counts.py."""
import pytest

from plait.ir import counts
from plait.ir.plan import Layout, even_stages
from plait.kinds.moe import cost as moe_cost
from plait.planner.cost import comm, compute, memory
from plait.planner.cost.context import Context
from plait.planner.cost.evaluate import evaluate
from plait.planner.cost.pipeline import CostTable
from plait.planner.layouts import units

FOLDING = Layout(tp=2, cp=1, dp=8, pp=8, etp=1, ep=8, edp=2, sp=True, mbs=1)


def test_attention_activations_by_hand(mixtral_job):
    ctx = Context(mixtral_job(), FOLDING)
    # tokens 4096, tp 2 with sequence parallel, bf16, flash attention (grouped K/V kept as is)
    stream = 4096 / 2 * 6144
    norm = stream * (4 + 2) + 4096 / 2 * 4  # fp32 input, bf16 normalised input, fp32 1/rms
    gathered = 4096 * 6144 * 2  # the projections' input: all tokens of the rank
    q, kv = 4096 * 6144 / 2 * 2, 4096 * 1024 / 2 * 2
    rope = 2 * 4096 * 128 * 2
    lse = 4096 * 48 / 2 * 4
    none, selective = memory.block_activations(ctx, "attention")
    assert none == pytest.approx(norm + gathered + q + 2 * kv + rope + lse + q)
    # selective keeps the input, the matmul outputs (qkv, o_proj) and the collectives' outputs
    assert selective == pytest.approx(stream * 2 + (q + 2 * kv) + 4096 * 6144 * 2
                                      + gathered + gathered / 2)


def test_moe_activations_by_hand(mixtral_job):
    ctx = Context(mixtral_job(), FOLDING)
    # each rank pushes etp * tokens/tp * top_k * load copies through its experts
    copies = 4096 / 2 * 2 * moe_cost.expert_load(ctx)
    assert moe_cost.routed_tokens(ctx) == pytest.approx(copies)
    h, f = 6144, 16384
    norm = 2048 * h * (4 + 2) + 2048 * 4
    own = 4096 / 2  # the rank's own tokens: the MoE input is sequence-parallel over tp
    # router input and fp32 logits/probs on own tokens; the dispatched copies and the experts'
    # fc1 / gate / up / product; the combine keeps the owner's top-k copies twice
    expect = (norm + own * h * 2 + own * 8 * 4 * 2 + copies * h * 2 + copies * 4 * f * 2
              + 2 * own * 2 * h * 2)
    assert memory.block_activations(ctx, "moe")[0] == pytest.approx(expect)


def test_fp32_zero1_keeps_a_master_shard_whose_gradient_is_the_buffers():
    """plait's ZeRO-1 in fp32: the flat fp32 shard the optimizer steps is a separate tensor beside
    the model's weights and gradients (1/dp), with Adam's m, v; its gradient is the flat gradient
    buffer's own shard, which the reduce-scatter writes (runtime/zero1.py): no bytes of its own."""
    t = counts.state_tensor_bytes("fp32", "zero1", 4)
    assert t == {"weights": 4, "grads": 4, "master": 1, "master_grads": 0, "moments": 2}
    assert counts.state_tensor_bytes("fp32", "replicated", 4)["master"] == 0
    assert counts.param_state_bytes("bf16", "zero1", 4)["optimizer"] == 3


def test_params_on_ranks_add_up(mixtral_job):
    job = mixtral_job()
    ctx = Context(job, FOLDING)
    dense, expert = memory.block_params_on_rank(ctx, "moe")
    assert expert * FOLDING.ep * FOLDING.etp == counts.expert_params(job.model)
    attn, _ = memory.block_params_on_rank(ctx, "attention")
    norm = counts.norm_params(job.model)
    assert (attn - norm) * FOLDING.tp == counts.block_params(job.model, "attention")


def test_state_bytes_shard_dense_over_dp_cp_and_experts_over_edp(mixtral_job):
    ctx = Context(mixtral_job(), FOLDING)
    s = memory.state_bytes(ctx, dense=1e9, expert=1e9)
    assert s["weights"] == pytest.approx(2e9 + 2e9)
    assert s["optimizer"] == pytest.approx(12e9 / 8 + 12e9 / 2)
    fsdp = memory.state_bytes(Context(mixtral_job(), Layout(**{**FOLDING.__dict__,
                                                               "dp_kind": "fsdp"})), 1e9, 0)
    # FSDP2 mixed precision: the fp32 shard is the master, bf16 weights exist only gathered
    assert fsdp["weights"] == 0 and fsdp["grads"] == pytest.approx(4e9 / 8)


def test_inflight_micro_batches():
    assert [memory.inflight(4, 1, 32, r) for r in range(4)] == [4, 3, 2, 1]
    assert memory.inflight(4, 1, 2, 0) == 2  # fewer micro-batches than stages
    # interleaved: rank 0 holds pp + (pp - 1) / vpp micro-batches of its layers
    assert memory.inflight(8, 2, 64, 0) == pytest.approx(8 + 7 / 2)


def test_flops_per_rank_match_counts(mixtral_job):
    job = mixtral_job()
    ctx = Context(job, FOLDING)
    ranks_per_stage = FOLDING.tp * FOLDING.cp * FOLDING.dp
    tokens = FOLDING.mbs * job.seq_len * FOLDING.dp
    for kind in ("attention", "moe"):
        work = compute.block_work(ctx, kind)
        per_token = counts.layer_flops(job.model, kind, job.seq_len)
        assert work.flops * ranks_per_stage == pytest.approx(tokens * per_token, rel=1e-9)


def test_ring_all_gather_and_topology(mixtral_job):
    job = mixtral_job()
    ctx = Context(job, FOLDING)
    intra = ctx.group("expert", "ep")
    assert (intra.size, intra.nodes) == (8, 1)
    cal = ctx.cal
    t = comm.all_gather(ctx, intra, 8e9)
    assert t == pytest.approx(7 / 8 * 8e9 / (450e9 * cal.intra_eff) + 7 * 3e-6)
    # the pre-folding layout with ETP 4 stretches an EP group of 8 over 4 nodes
    tp_ep_dp = Context(job, Layout(tp=4, dp=32, pp=1, etp=4, ep=8, edp=4, sp=True))
    g = tp_ep_dp.group("expert", "ep")
    assert (g.size, g.nodes) == (8, 4)
    assert comm.all_to_all(tp_ep_dp, g, 1e9) > comm.all_to_all(ctx, intra, 1e9)


def test_prediction_is_consistent(mixtral_job):
    job = mixtral_job()
    table = CostTable(job, FOLDING, units(job.model))
    stages = even_stages(112, 8, 1, "full")
    pred = evaluate(table, stages)
    m = table.microbatches
    assert m == 256 // 8
    tokens = job.global_batch * job.seq_len
    assert pred.tokens_per_s == pytest.approx(tokens / pred.step_time)
    flops = tokens * counts.flops_per_token(job.model, job.seq_len)
    assert pred.mfu == pytest.approx(flops / (pred.step_time * 128 * 989.5e12))
    assert pred.hardware_tflops_per_gpu > pred.tflops_per_gpu  # full recompute adds a forward
    assert 0 < pred.bubble < 7 / (m + 7) + 0.01
    assert len(pred.memory) == 8
    # rank 0 holds the most in-flight micro-batches, the last rank the logits
    assert pred.memory[0].activations > pred.memory[-1].activations
    assert pred.memory[-1].buffers > pred.memory[1].buffers


def test_recompute_trades_time_for_memory(mixtral_job):
    job = mixtral_job()
    table = CostTable(job, FOLDING, units(job.model))
    preds = {o: evaluate(table, even_stages(112, 8, 1, o)) for o in ("none", "selective", "full")}
    assert preds["none"].step_time < preds["selective"].step_time < preds["full"].step_time
    assert (preds["none"].peak_memory > preds["selective"].peak_memory
            > preds["full"].peak_memory)
