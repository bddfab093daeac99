"""Cost terms of the local CPU cluster's stack (gloo): what its collectives really run."""
from dataclasses import replace
from pathlib import Path

import pytest

from plait.ir.cluster import local_cpu
from plait.ir.dsl import load_job
from plait.ir.plan import Layout
from plait.kinds.mamba import cost as mamba_cost
from plait.planner import calibration
from plait.planner.cost import comm
from plait.planner.cost.context import Context, GroupShape

JOBS = Path(__file__).resolve().parents[2] / "specs" / "jobs"


def test_gloo_reduce_scatter_costs_an_all_reduce():
    """Gloo all-reduces the whole buffer and keeps a slice; NCCL's ring moves what an all-gather
    moves."""
    job = load_job(str(JOBS / "tiny-local.plait"))
    g = GroupShape(size=2, nodes=1)
    gloo = Context(job, Layout(tp=2))
    assert gloo.cluster.backend == "gloo"
    assert comm.reduce_scatter(gloo, g, 1e6) == pytest.approx(comm.all_reduce(gloo, g, 1e6))
    assert comm.reduce_scatter(gloo, g, 1e6) == pytest.approx(2 * comm.all_gather(gloo, g, 1e6))
    nccl = Context(replace(job, cluster=replace(job.cluster, backend="nccl")), Layout(tp=2))
    assert comm.reduce_scatter(nccl, g, 1e6) == pytest.approx(comm.all_gather(nccl, g, 1e6))


def test_the_embedded_local_cluster_is_gloo():
    assert local_cpu(2).backend == "gloo"


def _tiny(values: dict | None = None, layout: Layout = Layout(tp=2)) -> Context:
    job = load_job(str(JOBS / "tiny-local.plait"))
    return Context(calibration.overridden(job, values) if values else job, layout)


PER_OP = {"intra_latency_us": 1000.0, "intra_latency_us_all_reduce": 700.0,
          "intra_latency_us_all_gather": 900.0, "intra_latency_us_p2p": 2500.0}


def test_each_op_pays_its_own_measured_latency():
    """With per-op in-situ latencies each collective's latency terms are its own; the bandwidth
    terms do not change. An all-reduce of a pair: 2 terms, an all-gather 1, an exchange 1."""
    g, tiny = GroupShape(size=2, nodes=1), 16.0  # bytes: the latency is all that is left
    base, own = _tiny({"intra_latency_us": 1000.0}), _tiny(PER_OP)
    assert comm.all_reduce(base, g, tiny) == pytest.approx(2 * 1e-3, rel=1e-3)
    assert comm.all_reduce(own, g, tiny) == pytest.approx(2 * 0.7e-3, rel=1e-3)
    assert comm.all_gather(own, g, tiny) == pytest.approx(0.9e-3, rel=1e-3)
    assert comm.reduce_scatter(own, g, tiny) == comm.all_reduce(own, g, tiny)  # gloo
    assert comm.p2p(base, g, tiny) == pytest.approx(1e-3, rel=1e-3)
    assert comm.p2p(own, g, tiny) == pytest.approx(2.5e-3, rel=1e-3)
    big = 1e9  # the bytes' term is the same under either latency
    assert comm.all_reduce(own, g, big) - comm.all_reduce(base, g, big) == pytest.approx(-0.6e-3)
    assert comm.p2p(own, g, big) - comm.p2p(base, g, big) == pytest.approx(1.5e-3)


def test_without_per_op_values_the_spec_latency_is_charged():
    """No calibration: every op pays the cluster spec's intra-node latency, as before."""
    ctx, g = _tiny(), GroupShape(size=4, nodes=1)
    alpha, bw = ctx.cluster.intra.latency, ctx.cluster.intra.bandwidth * ctx.cal.intra_eff
    assert comm.all_gather(ctx, g, 4e6) == pytest.approx(3 / 4 * 4e6 / bw + 3 * alpha)
    assert comm.all_reduce(ctx, g, 4e6) == pytest.approx(2 * (3 / 4 * 4e6 / bw + 3 * alpha))
    assert comm.p2p(ctx, g, 4e6) == pytest.approx(4e6 / bw + alpha)


def test_per_op_latency_stays_inside_the_node():
    """The in-situ values are measured inside a node; a group across nodes pays the network's."""
    own, g = _tiny(PER_OP), GroupShape(size=2, nodes=2)
    assert comm.p2p(own, g, 16.0) == pytest.approx(own.cluster.inter.latency, rel=1e-3)


def test_pipeline_charges_the_exchanges_1f1b_issues():
    """Schedule1F1B fuses a stage's activation send with its next gradient receive: with pp = 2
    one exchange (one latency, both messages) per micro-batch, an interior stage (pp = 4) one per
    neighbour; the interleaved schedule sends and receives each on its own, asynchronously, at
    the level's latency (the measured exchange is one waited for at once)."""
    pp2, pp4, vpp = (_tiny(PER_OP, Layout(pp=p, vpp=v, mbs=2)) for p, v in ((2, 1), (4, 1), (2, 2)))
    g = pp2.group("dense", "pp")
    one = pp2.tokens_sp * pp2.model.hidden * pp2.act_bytes
    assert comm.pp_exchange(pp2) == pytest.approx(comm.p2p(pp2, g, 2 * one))
    assert comm.pp_exchange(pp4) == pytest.approx(2 * comm.p2p(pp4, g, one))
    assert comm.pp_exchange(vpp) == pytest.approx(2 * comm.p2p(vpp, g, one, waited=False))
    assert comm.p2p(vpp, g, 16.0, waited=False) == pytest.approx(1e-3, rel=1e-3)  # not 2.5 ms
    assert comm.pp_exchange(_tiny(PER_OP, Layout(tp=2))) == 0.0


def test_mamba_cp_charges_the_three_gathers_and_their_gloo_scatters():
    """lowering/mamba_cp.py gathers the conv halos, the states and the decays in three calls;
    backward each comes back as gather_seq's reduce-scatter, an all-reduce on gloo: with only
    latency left (per-op values, tiny volumes) 3 all-gather terms forward, 3 x 2 all-reduce
    terms backward."""
    job = load_job(str(JOBS / "tiny-hybrid-local.plait"))
    huge = {**PER_OP, "intra_eff": 1e6}  # the bytes' term vanishes
    ctx = Context(calibration.overridden(job, huge), Layout(cp=2, mbs=2))
    assert mamba_cost.cp_comm(ctx) == pytest.approx(3 * 0.9e-3, rel=1e-3)
    assert mamba_cost.cp_comm(ctx, backward=True) == pytest.approx(3 * 2 * 0.7e-3, rel=1e-3)
    assert mamba_cost.cp_comm(Context(job, Layout(dp=2, mbs=2))) == 0.0


def test_cp_host_work_is_charged_per_block_where_the_cp_path_runs():
    """The measured host work of CP's replacement ops (cp_host_us_*, runtime/calibrate_cp.py) goes
    to each Mamba block and ring attention block per micro-batch, the ring's with its steps; not
    to MLPs, not to the all-to-all attention, and nothing when unmeasured."""
    from plait.planner.cost.pipeline import host_seconds
    job = load_job(str(JOBS / "tiny-hybrid-local.plait"))
    cal = calibration.overridden(job, {"cp_host_us_attention": 3000.0, "cp_host_us_mamba": 9000.0})

    def host(j, kind, lay):
        return sum(host_seconds(Context(j, lay), (kind,)))

    for kind, extra in (("mamba", 9e-3), ("attention", 3e-3), ("mlp", 0.0)):
        plain = host(cal, kind, Layout(cp=2, mbs=2)) - extra
        assert plain == pytest.approx(host(cal, kind, Layout(dp=2, mbs=2)))
        assert host(job, kind, Layout(cp=2, mbs=2)) == pytest.approx(host(job, kind, Layout(dp=2, mbs=2)))
    ring4 = host(cal, "attention", Layout(cp=4, mbs=2)) - host(cal, "attention", Layout(dp=4, mbs=2))
    assert ring4 == pytest.approx(3e-3 * 4 / 2)  # four ring steps against the two measured
    a2a = Layout(cp=2, mbs=2, cp_comm="alltoall")
    assert host(cal, "attention", a2a) == pytest.approx(host(cal, "attention", Layout(dp=2, mbs=2)))


def test_mamba_cp_counts_the_final_states_and_the_correction():
    """Per chunk a final state (sum over tokens of x B^T) and the entering state's correction
    (C . E per token): two t x d_inner x state products beyond the scan, same tokens per rank."""
    job = load_job(str(JOBS / "tiny-hybrid-local.plait"))
    cp, plain = Context(job, Layout(cp=2, mbs=2)), Context(job, Layout(dp=2, mbs=1))
    assert cp.tokens == plain.tokens == 128
    m = job.model.mamba
    extra = mamba_cost.work(cp).flops - mamba_cost.work(plain).flops
    # and the carry across chunks changes with the pieces one scan call sees: under cp 2 four
    # zigzag halves of 32 tokens (one chunk each), without CP one sequence of 128 (four chunks)
    carry = m.heads * 2 * m.state * m.head_dim * (4 * (1 + 1) ** 2 - (4 + 1) ** 2)
    assert extra == pytest.approx(2 * 2 * cp.tokens * m.d_inner * m.state + carry)


def test_the_eager_scans_elementwise_work_adds_per_token_head_and_chunk_position():
    """runtime/calibrate_scan.py's law: the scan's core is its FLOPs at scan_eff plus
    scan_chunk_ns x chunk + scan_token_ns per token and head on the rank (heads split over TP)."""
    job = load_job(str(JOBS / "tiny-hybrid-local.plait"))
    m = job.model.mamba
    for lay in (Layout(mbs=2), Layout(tp=2, etp=2, sp=True, mbs=2)):
        fused = mamba_cost.work(Context(job, lay))
        eager = mamba_cost.work(Context(calibration.overridden(
            job, {"scan_chunk_ns": 5.0, "scan_token_ns": 100.0}), lay))
        tokens = lay.mbs * job.seq_len
        expected = tokens * m.heads / lay.tp * (5.0 * m.chunk + 100.0) * 1e-9
        assert eager.core - fused.core == pytest.approx(expected)


def test_explain_names_the_measured_cp_host_work():
    from plait.planner.explain import overlap_facts
    job = load_job(str(JOBS / "tiny-hybrid-local.plait"))
    cal = calibration.overridden(job, {"cp_host_us_attention": 3000.0, "cp_host_us_mamba": 9000.0})
    facts = overlap_facts(cal, Layout(cp=2, mbs=2))
    assert any("attention 3.00 ms, mamba 9.00 ms" in f for f in facts)
    assert not any("host work" in f for f in overlap_facts(job, Layout(cp=2, mbs=2)))


def test_sequence_parallel_gathers_pay_the_synced_latency():
    """Each block's gather follows the previous block's scatter: it pays the back-to-back latency
    when one is measured, the all-gather's otherwise; the scatter (gloo: an all-reduce) keeps its
    in-situ one."""
    huge = {**PER_OP, "intra_eff": 1e6}
    synced = {**huge, "intra_latency_us_all_gather_synced": 300.0}
    job = load_job(str(JOBS / "tiny-local.plait"))
    lay = Layout(tp=2, sp=True, mbs=2)
    plain = comm.tp_comm(Context(calibration.overridden(job, huge), lay))
    faster = comm.tp_comm(Context(calibration.overridden(job, synced), lay))
    assert plain - faster == pytest.approx(0.9e-3 - 0.3e-3, rel=1e-3)
    no_sp = Layout(tp=2, sp=False, mbs=2)
    assert comm.tp_comm(Context(calibration.overridden(job, synced), no_sp)) == pytest.approx(
        comm.tp_comm(Context(calibration.overridden(job, huge), no_sp)))
