"""The cost model's data-parallel terms: FSDP's per-unit gathers and scatters, how much of them
and of ZeRO-1's once-per-step sync compute hides, FSDP2's own host work, and the optimizer step's
bytes per parameter."""
from dataclasses import replace

import pytest

from plait.ir.job import MoEOptions
from plait.ir.plan import Layout
from plait.planner.cost import comm, compute
from plait.planner.cost.context import Context

from cost_util import calibrated, stages_of_one


def test_fsdp_first_gather_and_last_scatter_of_a_chunk_are_exposed(mixtral_job):
    """Per unit, the next unit's gather hides behind this one's compute; the chunk's first
    gather and its last gradient scatter have nothing to hide behind. The chunk pays, per
    micro-batch, what its first unit's own compute was credited with hiding."""
    from plait.planner.cost.pipeline import CostTable
    from plait.planner.layouts import units
    job = replace(mixtral_job(), moe=MoEOptions(capacity_factor=1.0))
    fsdp = Layout(tp=1, dp=128, etp=1, ep=8, edp=16, dp_kind="fsdp")
    table = CostTable(job, fsdp, units(job.model))
    ctx, unit = table.ctx, table.units[0]
    gather, scatter = comm.fsdp_unit(ctx, unit.dense_params, unit.expert_params)
    assert 0 < unit.fsdp_edge <= gather + scatter  # at most one gather and one scatter
    assert table.chunk_time == pytest.approx(table.p2p + unit.fsdp_edge)
    # no FSDP, no edge
    zero1 = CostTable(job, replace(fsdp, dp_kind="zero1"), units(job.model))
    assert zero1.fsdp_edge == 0.0 and zero1.chunk_time == zero1.p2p
    # communication-bound (no overlap window): the per-unit terms already expose it all
    none = CostTable(calibrated(job, overlap_fsdp=0.0), fsdp, units(job.model))
    assert none.fsdp_edge == 0.0


def _fsdp_step(job, layout, eff: float):
    from plait.planner.cost.evaluate import evaluate
    from plait.planner.cost.pipeline import CostTable, stages_of
    from plait.planner.layouts import units
    table = CostTable(calibrated(job, overlap_fsdp=eff, overlap_all_gather=eff,
                                 overlap_reduce_scatter=eff), layout, units(job.model))
    return table, evaluate(table, stages_of(table, (len(table.units),), (0,))).step_time


def test_fsdp_overlap_zero_vs_one_moves_the_step_by_exactly_the_collective_time(gpt_job):
    """GPT 7.5B, FSDP over one DGX (NVLink): every unit's gathers and gradient scatter are
    shorter than its compute. Fully hidden (1) they cost only the chunk's edge (first gather,
    last scatter); serialised (0) every second of them is on the step. The difference is the
    collectives' seconds from comm.fsdp_unit, nothing else (the embedding's and the head's, units
    of their own under FSDP, hide what their own short compute can)."""
    job = gpt_job(4096, 32, 32, 8, 64)
    lay = Layout(tp=1, dp=8, pp=1, mbs=2, dp_kind="fsdp")
    hidden, t_hidden = _fsdp_step(job, lay, 1.0)
    exposed, t_exposed = _fsdp_step(job, lay, 0.0)
    assert all("dp" not in dict(u.comm) for u in hidden.units)  # compute-bound: all hidden
    moved = [comm.fsdp_unit(hidden.ctx, u.dense_params, u.expert_params) for u in hidden.units]
    per_microbatch = sum(2 * g + s for g, s in moved) - max(g + s for g, s in moved)
    ends = [comm.fsdp_unit(hidden.ctx, x.params, 0.0) for x in (hidden.first, hidden.last)]
    assert all(g > 0 and s > 0 for g, s in ends)
    per_microbatch += sum(x.time - y.time for x, y in ((exposed.first, hidden.first),
                                                       (exposed.last, hidden.last)))
    assert hidden.fsdp_edge == pytest.approx(max(g + s for g, s in moved))
    assert exposed.fsdp_edge == 0.0
    assert t_exposed - t_hidden == pytest.approx(hidden.microbatches * per_microbatch, rel=1e-9)


def test_fsdp_overlap_hides_its_share_of_the_overlapped_time(gpt_job):
    """Between the limits the hidden seconds scale with the efficiency (hidden = eff x min(
    collective, compute)), for FSDP's per-unit traffic and for ZeRO-1's once-per-step gradient
    reduce-scatter and parameter all-gather alike: the same collectives beside the same GEMMs."""
    from plait.planner.cost.evaluate import overlap_passes, rank_cost
    job = gpt_job(4096, 32, 32, 8, 64)
    lay = Layout(tp=1, dp=8, pp=1, mbs=2, dp_kind="fsdp")
    steps = [_fsdp_step(job, lay, eff)[1] for eff in (0.0, 0.25, 0.5, 1.0)]
    assert steps[0] - steps[1] == pytest.approx((steps[0] - steps[3]) / 4, rel=1e-9)
    assert steps[0] - steps[2] == pytest.approx((steps[0] - steps[3]) / 2, rel=1e-9)
    zero1 = replace(lay, dp_kind="zero1")
    table, serial = _fsdp_step(job, zero1, 0.0)
    rc = rank_cost(table, stages_of_one(table), 0)
    red, gather = comm.dp_sync(table.ctx, rc.dense_params, rc.expert_params)
    passes = overlap_passes(1, 1, table.microbatches)
    overlapped = min(red, passes * (rc.time - rc.fwd)) + min(gather, passes * rc.fwd)
    assert red > 0 and gather > 0 and overlapped > 0
    for eff in (0.25, 1.0):
        assert serial - _fsdp_step(job, zero1, eff)[1] == pytest.approx(eff * overlapped,
                                                                        rel=1e-9)


def test_a_stack_that_syncs_after_the_backward_hides_none_of_it(gpt_job):
    """dp_sync_overlap 0 (plait's runtime: replicated / ZeRO-1 reduce after the backward): the
    step is the serial one whatever the collectives' overlap; 1 (Megatron's overlapped sync)
    hides its share."""
    from plait.planner.cost.evaluate import evaluate
    from plait.planner.cost.pipeline import CostTable
    from plait.planner.layouts import units
    job = gpt_job(4096, 32, 32, 8, 64)
    lay = Layout(tp=1, dp=8, pp=1, mbs=2, dp_kind="zero1")

    def step(**values):
        table = CostTable(calibrated(job, **values), lay, units(job.model))
        return evaluate(table, stages_of_one(table)).step_time
    full = {"overlap_all_gather": 1.0, "overlap_reduce_scatter": 1.0}
    serial = step(overlap_all_gather=0.0, overlap_reduce_scatter=0.0)
    assert step(dp_sync_overlap=0.0, **full) == pytest.approx(serial, rel=1e-12)
    assert step(dp_sync_overlap=1.0, **full) < serial


def test_uncalibrated_overlap_is_the_literature_default():
    from plait.planner.cost.context import Calibration
    cal = Calibration()
    assert cal.overlap_all_gather == cal.overlap_reduce_scatter == cal.overlap_all_to_all == 0.84
    assert cal.overlap_p2p == cal.overlap_fsdp == 0.84


def test_fsdp_step_moves_two_gathers_and_one_scatter_per_microbatch_exactly(qwen_job):
    """Qwen2-57B-A14B, pure FSDP over 64 H100 on 8 nodes (every ring crosses the NIC), nothing
    hidden: the step's exposed FSDP seconds are, per micro-batch, counts.fsdp_bytes_per_microbatch
    of every unit's parameters (the embedding and the head included: FSDP shards them as units of
    their own; the final norm, FSDP's root, once gathered and once scattered) times (n - 1) / n
    over the rank's NIC, plus one link latency per ring hop of each collective. Halving the micro-batch doubles the micro-batches and so the traffic."""
    from plait.ir import counts
    from plait.planner.cost.context import cluster_links
    from plait.planner.cost.evaluate import evaluate
    from plait.planner.cost.pipeline import CostTable, stages_of
    from plait.planner.layouts import units
    job = calibrated(qwen_job(), overlap_fsdp=0.0, fsdp_eff=1.0)
    n = 64
    seconds = {}
    for mbs in (1, 2, 4):
        lay = Layout(tp=1, dp=n, pp=1, etp=1, ep=1, edp=n, mbs=mbs, dp_kind="fsdp")
        table = CostTable(job, lay, units(job.model))
        pred = evaluate(table, stages_of(table, (len(table.units),), (0,)))
        _, nic, _, latency = cluster_links(job.cluster, table.ctx.cal)
        norm = counts.final_norm_params(job.model)
        groups = [(u.dense_params, u.expert_params) for u in table.units]
        groups += [(table.first.params, 0.0), (table.last.params - norm, 0.0)]
        moved = sum(counts.fsdp_bytes_per_microbatch(d + e, "bf16") for d, e in groups)
        rings = sum(3 * ((d > 0) + (e > 0)) for d, e in groups)
        # the final norm stays with FSDP's root: one bf16 gather, one fp32 scatter
        moved, rings = moved + norm * (2 + 4), rings + 2
        per_microbatch = (n - 1) / n * moved / nic + rings * (n - 1) * latency
        assert table.microbatches == 256 // (n * mbs)
        assert dict(pred.exposed_comm)["dp"] == pytest.approx(
            table.microbatches * per_microbatch, rel=1e-9)
        seconds[mbs] = dict(pred.exposed_comm)["dp"]
    assert seconds[1] == pytest.approx(2 * seconds[2]) and seconds[2] == pytest.approx(2 * seconds[4])


def test_fsdp_host_work_is_charged_once_per_unit_and_microbatch():
    """tiny-local on 2 CPU ranks under FSDP (the host runs the kernels: host time adds up),
    nothing hidden: fsdp_host_us (FSDP2's hooks and copies, measured by `plait calibrate`) adds
    exactly that many microseconds per micro-batch for every FSDP unit the runtime makes: each
    layer unit, the embedding, the head and the root that keeps the final norm. ZeRO-1 pays none."""
    from plait.ir.dsl import load_job
    from plait.planner.cost.evaluate import evaluate
    from plait.planner.cost.pipeline import CostTable
    from plait.planner.layouts import units
    job = load_job("specs/jobs/tiny-local.plait")
    fsdp = Layout(dp=2, mbs=2, dp_kind="fsdp", recompute="none")
    assert Context(job, fsdp).cal.host_sync >= 0.5  # the CPU: host time adds to device time

    def step(layout, host_us):
        table = CostTable(calibrated(job, overlap_fsdp=0.0, fsdp_host_us=host_us), layout,
                          units(job.model))
        return table, evaluate(table, stages_of_one(table)).step_time
    table, without = step(fsdp, 0.0)
    _, charged = step(fsdp, 1000.0)
    fsdp_units = len(table.units) + 3
    assert charged - without == pytest.approx(table.microbatches * fsdp_units * 1e-3, rel=1e-9)
    zero1 = replace(fsdp, dp_kind="zero1")
    assert step(zero1, 1000.0)[1] == step(zero1, 0.0)[1]


def test_the_optimizer_step_moves_its_stacks_bytes_per_parameter():
    """plait's runtime (the CPU device, `plait calibrate` files) steps torch's fused AdamW after a
    global-norm clip, 40 bytes per parameter (counts.adamw_path, the choice the runtime builds its
    optimizer from); Megatron-Core's fused Adam (the default: the reference rows' stack) 30. Both
    memory-bound over this rank's shard."""
    from plait.ir import counts
    from plait.ir.dsl import load_job
    job = load_job("specs/jobs/tiny-local.plait")
    runtime = Context(job, Layout(dp=2, dp_kind="zero1"))
    fused = Context(calibrated(job, optimizer_bytes=counts.FUSED_ADAM_STEP_BYTES),
                    Layout(dp=2, dp_kind="zero1"))
    assert runtime.cal.optimizer_bytes == counts.adamw_path("cpu").step_bytes == 40
    assert compute.optimizer_time(runtime, 2e6, 2) == pytest.approx(
        compute.memory_time(runtime, 40e6), rel=1e-12)
    assert compute.optimizer_time(fused, 2e6, 2) == pytest.approx(
        compute.optimizer_time(runtime, 2e6, 2) * 30 / 40, rel=1e-12)
