"""The cost model's physics terms: monotonicity and limits (all-to-all vs message size and group
shape, grouped expert GEMM vs tokens per expert, attention backward rate, shared cores, measured
latencies)."""
from dataclasses import replace

import pytest

from plait.ir.job import MoEOptions
from plait.ir.plan import Layout
from plait.kinds.attention import cost as attention_cost
from plait.kinds.mlp import cost as mlp_cost
from plait.kinds.moe import cost as moe_cost
from plait.planner.cost import comm, compute
from plait.planner.cost.context import Context, GroupShape

from cost_util import calibrated

FOLDING = Layout(tp=2, dp=8, pp=8, etp=1, ep=8, edp=2, sp=True)


@pytest.fixture
def ctx(mixtral_job):
    return Context(replace(mixtral_job(), moe=MoEOptions(capacity_factor=1.0)), FOLDING)


def test_all_to_all_reaches_more_of_the_link_with_bigger_messages(ctx):
    g = GroupShape(size=8, nodes=1)
    sizes = [8 * 2**k for k in range(4, 28, 2)]
    per_byte = [comm.all_to_all(ctx, g, s) / s for s in sizes]
    assert all(a > b for a, b in zip(per_byte, per_byte[1:]))
    # the limit: bandwidth alone, 7/8 of the bytes over NVLink at a2a_eff
    b_in = ctx.cluster.intra.bandwidth * ctx.cal.intra_eff * ctx.cal.a2a_eff
    assert per_byte[-1] == pytest.approx(7 / 8 / b_in, rel=1e-3)
    # small messages: latency-bound, 7 peer messages + one sync
    assert comm.all_to_all(ctx, g, 8) == pytest.approx(8 * ctx.cluster.intra.latency, rel=1e-3)


def test_all_to_all_gets_slower_as_the_group_spreads_over_nodes(ctx):
    nbytes = 64e6
    times = [comm.all_to_all(ctx, GroupShape(size=8, nodes=n), nbytes) for n in (1, 2, 4, 8)]
    assert all(a < b for a, b in zip(times, times[1:]))
    # one rank per node: every peer's bytes behind the NIC
    b_out = ctx.cluster.inter.bandwidth * ctx.cal.inter_eff * ctx.cal.a2a_eff
    assert times[-1] == pytest.approx(7 / 8 * nbytes / b_out + 8 * ctx.cluster.inter.latency)


def test_all_to_all_levels_use_their_own_efficiency(ctx):
    """Inside a node only NVLink's a2a_eff counts; spread over nodes, the NIC's share runs at
    a2a_inter_eff (unset: a2a_eff)."""
    nbytes, spread, inside = 64e6, GroupShape(size=8, nodes=8), GroupShape(size=8, nodes=1)
    slow_net = Context(calibrated(ctx.job, a2a_inter_eff=ctx.cal.a2a_eff / 2), FOLDING)
    assert comm.all_to_all(slow_net, inside, nbytes) == comm.all_to_all(ctx, inside, nbytes)
    bw_part = 7 / 8 * nbytes / (ctx.cluster.inter.bandwidth * ctx.cal.inter_eff * ctx.cal.a2a_eff)
    assert comm.all_to_all(slow_net, spread, nbytes) - comm.all_to_all(ctx, spread, nbytes) == \
        pytest.approx(bw_part)  # twice the bandwidth term, the latencies unchanged


def test_grouped_gemm_efficiency_grows_with_tokens_per_expert(ctx):
    n, k, experts = 16384, 6144, 8
    rates = [2 * r * experts * n * k / compute.grouped_gemm_time(ctx, r, n, k, experts)
             for r in (128, 256, 512, 1024, 4096, 16384)]
    assert all(a < b for a, b in zip(rates, rates[1:]))
    assert rates[-1] < ctx.peak * ctx.cal.gemm_eff  # never above the large-GEMM efficiency


def test_grouped_gemm_pads_each_expert_to_a_tile(ctx):
    # (compute-bound sizes: below ~300 rows reading the experts' weights takes longer)
    tile = ctx.cal.gemm_tile
    one_more_row = compute.grouped_gemm_time(ctx, 3 * tile + 1, 4096, 4096, 8)
    full_tiles = compute.grouped_gemm_time(ctx, 4 * tile, 4096, 4096, 8)
    assert one_more_row == pytest.approx(full_tiles)  # a row costs its whole tile
    assert compute.grouped_gemm_time(ctx, 4 * tile + 1, 4096, 4096, 8) > full_tiles


def test_grouped_gemm_beats_a_loop_of_small_gemms(ctx, mixtral_job):
    loop = Context(calibrated(ctx.job, grouped_gemm=0.0), FOLDING)
    for rows in (512, 1024, 2048):  # compute-bound: the knee on 16x the rows
        assert compute.grouped_gemm_time(ctx, rows, 2560, 3584, 16) < \
            compute.grouped_gemm_time(loop, rows, 2560, 3584, 16)
    # memory-bound (reading the weights): the same either way
    assert compute.grouped_gemm_time(ctx, 64, 2560, 3584, 16) == pytest.approx(
        compute.grouped_gemm_time(loop, 64, 2560, 3584, 16))
    # one expert: the same GEMM either way
    assert compute.grouped_gemm_time(ctx, 512, 2560, 3584, 1) == \
        pytest.approx(compute.gemm_time(ctx, 512, 2560, 3584))


def test_the_experts_loop_path_pays_its_copies(ctx):
    """The loop path concatenates the experts' outputs (forward), their input gradients and stacks
    their weight gradients (backward), at the memory rate; one grouped GEMM writes in place."""
    assert compute.expert_loop_times(ctx, 64, 2560, 3584, 16) == (0.0, 0.0)  # grouped_gemm = 1
    loop = Context(calibrated(ctx.job, grouped_gemm=0.0), FOLDING)
    fwd, bwd = compute.expert_loop_times(loop, 64, 2560, 3584, 16)
    b, hbm = loop.act_bytes, loop.hbm * loop.cal.hbm_eff
    assert fwd == pytest.approx(2 * 16 * 64 * 2560 * b / hbm)
    assert bwd == pytest.approx(2 * 16 * (64 * 3584 + 2560 * 3584) * b / hbm)
    # the routed experts' FFN carries both linears' copies; a dense FFN (no loop) none
    h, width = loop.model.hidden, 2048
    routed = compute.ffn_work(loop, 64, width, True, 16, routed=True)
    dense = compute.ffn_work(loop, 64, width, True, 16)
    up, down = (compute.expert_loop_times(loop, 64, 2 * width, h, 16),
                compute.expert_loop_times(loop, 64, h, width, 16))
    assert routed.gemm - dense.gemm == pytest.approx(up[0] + down[0])
    assert routed.backward_gemm - dense.backward_gemm == pytest.approx(up[1] + down[1])


def test_attention_backward_rate(ctx):
    work = attention_cost.work(ctx)
    slow = attention_cost.work(Context(calibrated(ctx.job, attn_bwd_ratio=0.5), FOLDING))
    assert slow.backward - work.backward == pytest.approx(
        compute.BWD_CORE * work.core * (1 / 0.5 - 1 / ctx.cal.attn_bwd_ratio))
    assert slow.forward == pytest.approx(work.forward)



def test_scan_backward_rate():
    """The SSD scan's backward at the measured rate (the runtime recomputes the scan there):
    backward = BWD_CORE x forward / scan_bwd_ratio; the default 1 keeps BWD_CORE x forward."""
    from pathlib import Path
    from plait.ir.dsl import load_job
    from plait.kinds.mamba import cost as mamba_cost
    job = load_job(str(Path(__file__).resolve().parents[2] / "specs/jobs/tiny-hybrid-local.plait"))
    lay = Layout(dp=2, mbs=2)
    work = mamba_cost.work(Context(calibrated(job, scan_bwd_ratio=1.0), lay))
    slow = mamba_cost.work(Context(calibrated(job, scan_bwd_ratio=0.65), lay))
    assert slow.backward - work.backward == pytest.approx(compute.BWD_CORE * work.core * (1 / 0.65 - 1))
    assert slow.forward == pytest.approx(work.forward)


def test_shared_cores_divide_compute_not_gpus(ctx):
    lay = Layout(dp=4)
    job = ctx.job
    own = Context(job, lay)
    assert own.sharing == 1.0
    shared = Context(calibrated(job, shared_cores=2.0), lay)
    assert shared.sharing == pytest.approx(2.0)  # 4 ranks on the node's 2 cores
    assert compute.gemm_time(shared, 4096, 4096, 4096) == pytest.approx(
        2 * compute.gemm_time(own, 4096, 4096, 4096))
    assert compute.memory_time(shared, 1e9) == pytest.approx(2 * compute.memory_time(own, 1e9))
    more = Context(calibrated(job, shared_cores=8.0), lay)
    assert more.sharing == 1.0  # more cores than ranks: no slow-down


def test_measured_latency_replaces_the_spec(ctx):
    g = GroupShape(size=8, nodes=1)
    slow = Context(calibrated(ctx.job, intra_latency_us=100.0), FOLDING)
    assert comm.all_gather(slow, g, 8) - comm.all_gather(ctx, g, 8) == pytest.approx(
        7 * (100e-6 - ctx.cluster.intra.latency), rel=1e-3)


def test_interleaving_widens_the_data_parallel_overlap_window():
    from plait.planner.cost.evaluate import overlap_passes
    assert overlap_passes(8, 1, 32) == 1.0  # 1F1B: the last backward only
    assert overlap_passes(4, 4, 32) == pytest.approx((3 * 4 + 1) / 4)
    assert overlap_passes(4, 2, 32) < overlap_passes(4, 4, 32) < overlap_passes(8, 4, 32)
    assert overlap_passes(8, 4, 2) == 2.0  # never more than the step's micro-batches


def test_step_reductions_are_two_latency_bound_all_reduces(ctx):
    world = FOLDING.world  # 128 ranks on 16 nodes: the NIC's latency, 127 hops, twice each
    expected = 2 * 2 * (127 * ctx.cluster.inter.latency + 127 / 128 * 4 / (
        ctx.cluster.inter.bandwidth * ctx.cal.inter_eff))
    assert comm.step_reductions(ctx) == pytest.approx(expected)
    assert world == 128


def test_ring_attention_merges_partial_outputs(mixtral_job):
    job = replace(mixtral_job(), seq_len=65536)
    merges = {}
    for cp in (1, 2, 4, 8):
        ctx = Context(job, Layout(tp=8, cp=cp, dp=1, pp=16, etp=1, ep=8, edp=1, sp=True))
        merges[cp] = attention_cost.ring_merge_bytes(ctx)
    assert merges[1] == 0.0
    # (cp - 1) merges of tokens / cp query rows: grows with cp, towards the rank's own queries x cp
    assert merges[2] < merges[4] < merges[8]
    ctx = Context(job, Layout(tp=8, cp=4, dp=1, pp=16, etp=1, ep=8, edp=1, sp=True))
    assert merges[4] == 3 * ctx.tokens * 6144 / 8 * attention_cost.MERGE_BYTES
    ulysses = Context(job, Layout(tp=8, cp=4, dp=1, pp=16, etp=1, ep=8, edp=1, sp=True,
                                  cp_comm="alltoall"))
    assert attention_cost.ring_merge_bytes(ulysses) == 0.0
    # at 64K with cp 4 (16K keys per step) the merges cost a few percent of the attention core
    work = attention_cost.work(ctx)
    share = compute.memory_time(ctx, merges[4]) / work.core
    assert 0.01 < share < 0.2


def test_host_cost_adds_on_a_cpu_and_hides_behind_an_accelerator(mixtral_job):
    from plait.planner.cost.pipeline import build_unit, host_seconds
    job = mixtral_job()
    lay = FOLDING
    base = build_unit(Context(job, lay), ("attention", "moe"))
    sync = Context(calibrated(job, host_us_attention=300.0, host_us_moe=600.0), lay)
    assert host_seconds(sync, ("attention", "moe")) == pytest.approx((300e-6, 600e-6))
    assert build_unit(sync, ("attention", "moe")).fwd == pytest.approx(base.fwd + 300e-6)
    # asynchronous: a block is as slow as the slower of device and host (here the device)
    lazy = Context(calibrated(job, host_us_attention=300.0, host_us_moe=600.0, host_sync=0.0), lay)
    assert build_unit(lazy, ("attention", "moe")).fwd == pytest.approx(base.fwd)
    # kernel_us alone: a third forward, two thirds backward of 3 x kernel_us per block
    old = Context(calibrated(job, kernel_us=50.0), lay)
    assert host_seconds(old, ("attention", "moe")) == pytest.approx((100e-6, 200e-6))


def test_moe_host_cost_follows_the_local_experts(mixtral_job):
    """host_us_moe is the block without its experts; each local expert (experts / ep) adds its
    own, as the loop path's linears do (runtime/calibrate_host.py). Mixtral has no shared one."""
    from plait.planner.cost.pipeline import host_seconds
    job = calibrated(mixtral_job(), host_us_moe=600.0, host_us_moe_expert=30.0,
                     host_us_moe_shared=200.0)
    for ep in (1, 2, 8):
        lay = replace(FOLDING, ep=ep, edp=FOLDING.edp * FOLDING.ep // ep)
        total = sum(host_seconds(Context(job, lay), ("moe",)))
        assert total == pytest.approx((600.0 + 30.0 * 8 / ep) * 1e-6)


def test_weight_gradient_accumulates_in_fp32_on_the_memory_side(ctx):
    """Backward = dgrad + wgrad. Compute-bound, twice the forward; with few rows per weight the
    wgrad's read-modify-write of the fp32 main gradient (8 bytes per weight) sets its time."""
    big_f, big_b = compute.gemm_times(ctx, 8192, 8192, 8192)
    assert big_b == pytest.approx(2 * big_f)
    rows, n, k = 16, 4096, 4096
    fwd, bwd = compute.gemm_times(ctx, rows, n, k)
    hbm = ctx.hbm * ctx.cal.hbm_eff
    assert fwd == pytest.approx(2 * (rows * k + k * n + rows * n) / hbm)  # reads the weight
    assert bwd - fwd == pytest.approx((2 * (rows * k + rows * n) + 8 * k * n) / hbm)
    assert bwd > 4 * fwd  # the weight's fp32 gradient outweighs the rows by far
    # the experts' grouped GEMM: every expert's weight gradient, whatever its rows
    g_f, g_b = compute.grouped_gemm_times(ctx, rows, n, k, 8)
    assert g_b - g_f == pytest.approx(8 * (bwd - fwd))


def test_mlp_backward_reads_its_gemms_backward(ctx):
    work = mlp_cost.work(ctx) if ctx.model.mlp else compute.block_work(ctx, "moe")
    assert work.backward_gemm >= 2 * work.gemm * (1 - 1e-12)
    assert work.backward == pytest.approx(
        work.backward_gemm + compute.BWD_MEMORY * work.memory)


def _random_routing_max(tokens, top_k, experts, ranks, trials, seed=0):
    """Mean over trials of the busiest rank's copies over the mean, every token picking top_k
    distinct experts uniformly (the top-k of iid uniform scores)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    picks = torch.rand(trials, tokens, experts, generator=gen).topk(top_k, dim=-1).indices
    per_expert = torch.zeros(trials, experts, dtype=torch.int64).scatter_add_(
        1, picks.view(trials, -1), torch.ones(trials, tokens * top_k, dtype=torch.int64))
    per_rank = per_expert.view(trials, ranks, experts // ranks).sum(-1).double()
    return (per_rank.max(-1).values.mean() / (tokens * top_k / ranks)).item()


@pytest.mark.parametrize("tokens, top_k, experts, ranks", [
    (2048, 2, 8, 8),  # Mixtral-like: one expert per rank
    (1024, 8, 64, 4),  # Qwen2-like: fine-grained, 16 experts per rank
    (256, 2, 8, 2),  # few tokens: the largest imbalance
])


def test_expected_max_load_matches_random_routing(tokens, top_k, experts, ranks):
    """The closed form against a seeded simulation of the same router. Tolerance on the excess
    over 1: 10%, about five standard errors of a 300-trial mean of the maximum plus Blom's
    approximation error (4% at n = 2, under 1% from n = 4)."""
    want = _random_routing_max(tokens, top_k, experts, ranks, trials=300)
    got = moe_cost.expected_max_load(tokens, top_k, experts, ranks)
    assert got - 1 == pytest.approx(want - 1, rel=0.10)


def test_routing_imbalance_shrinks_with_tokens_and_grows_with_ranks():
    by_tokens = [moe_cost.expected_max_load(t, 2, 64, 8) for t in (512, 4096, 32768)]
    assert by_tokens[0] > by_tokens[1] > by_tokens[2] > 1.0
    by_ranks = [moe_cost.expected_max_load(8192, 2, 64, r) for r in (2, 8, 64)]
    assert by_ranks[0] < by_ranks[1] < by_ranks[2]
    assert moe_cost.expected_max_load(8192, 2, 64, 1) == 1.0  # one rank holds every expert


def test_measured_imbalance_replaces_random_routing(ctx):
    dropless = replace(ctx.job, moe=MoEOptions())
    assert moe_cost.expert_load(Context(dropless, FOLDING)) == pytest.approx(
        moe_cost.expected_max_load(FOLDING.ep * ctx.tokens / FOLDING.tp, 2, 8, FOLDING.ep))
    assert moe_cost.expert_load(Context(calibrated(dropless, moe_imbalance=1.3), FOLDING)) == 1.3
    # a capacity factor caps the busiest rank at cf x its share
    capped = replace(ctx.job, moe=MoEOptions(capacity_factor=1.1))
    assert moe_cost.expert_load(Context(calibrated(capped, moe_imbalance=1.3), FOLDING)) == 1.1


def test_ring_backward_hides_behind_the_backward_core_at_its_rate(mixtral_job):
    """Ring CP: each step's K/V exchange runs under that step's attention kernels. Backward sends
    twice the forward's bytes under the backward kernels, which take 2.5x the forward core over
    attn_bwd_ratio: a slower backward core hides more, overlap_p2p of the shorter of the two."""
    from plait.planner.cost.pipeline import block_comm
    lay = Layout(tp=1, cp=8, dp=16, mbs=1, cp_comm="ring")
    ctx = Context(mixtral_job(), lay)
    ring = attention_cost.cp_comm(ctx)
    for rate in (1.0, 0.86, 0.5):
        work = compute.Work(core=0.5 * ring, core_bwd_rate=rate)
        fwd, bwd = block_comm(ctx, "attention", work)
        eff = ctx.cal.overlap_p2p
        assert fwd["cp"] == pytest.approx(ring - eff * 0.5 * ring)
        assert bwd["cp"] == pytest.approx(2 * ring - eff * min(2 * ring, 2.5 * 0.5 * ring / rate))


def test_a_sliding_window_cuts_attention_core_and_ring_exchanges():
    """Mistral-7B-v0.1 at 32K on cp 4 (zigzag chunks of 4K, window 4096): each query sees ~4K keys
    instead of ~16K, and the ring skips the exchange whose K/V block no query sees (2 of 3). The
    core's seconds fall with its FLOPs, less the kernel's lower efficiency on the window's 4K key
    span than on the rank's 8K sequence (compute.attention_eff, the H100's attn_knee)."""
    from plait.ir.dsl import load_job
    job = load_job("specs/jobs/mistral-7b-v0.1-32k.plait")
    full = replace(job, model=replace(job.model, attention=replace(job.model.attention, window=None)))
    layout = Layout(tp=1, cp=4, dp=4, pp=2)
    windowed, causal = Context(job, layout), Context(full, layout)
    # s w - w^2 / 2 of the s^2 / 2 triangle: (32K * 4K - 8M) / 512M = 15/64
    slower = compute.attention_eff(windowed.cal, 8192) / compute.attention_eff(windowed.cal, 4096)
    assert attention_cost.work(windowed).core == pytest.approx(
        attention_cost.work(causal).core * 15 / 64 * slower, rel=1e-12)
    assert attention_cost.cp_comm(windowed) == pytest.approx(
        attention_cost.cp_comm(causal) * 2 / 3, rel=1e-12)
    assert attention_cost.ring_merge_bytes(windowed) == pytest.approx(
        attention_cost.ring_merge_bytes(causal) * 2 / 3)
