"""`plait calibrate`'s fits and derivation (tier 1, synthetic measurements with known answers),
and the command end to end on two local gloo ranks (tier 2)."""
import json
import statistics

import pytest

from plait.cli import main
from plait.ir.cluster import local_cpu
from plait.planner import calibration
from plait.runtime.calibrate_cost import derive, fit_alpha_beta, fit_knee
from plait.runtime.calibrate_attention import fit_attention
from plait.runtime.calibrate_insitu import insitu_latency
from plait.runtime.calibrate_overlap import hidden_fraction

from test_calibrate_scan import scan_points

PEAK = 1e11


def test_fit_knee_recovers_efficiency_and_knee():
    eff, knee = 0.6, 48.0
    shapes = [(32, 512, 512), (128, 256, 128), (512, 512, 512), (2048, 1024, 2048), (64, 64, 64)]
    points = [(m, n, k, PEAK * eff / (1 + knee * (1 / m + 1 / n + 1 / k))) for m, n, k in shapes]
    got_eff, got_knee = fit_knee(points, PEAK)
    assert got_eff == pytest.approx(eff, rel=1e-6)
    assert got_knee == pytest.approx(knee, rel=1e-6)


def test_fit_knee_without_a_knee_takes_the_big_shapes():
    """Small shapes measured faster than big ones (noise, caches): no knee, the big shapes' rate."""
    points = [(64, 64, 64, 0.5 * PEAK), (128, 128, 128, 0.45 * PEAK), (512, 512, 512, 0.4 * PEAK),
              (1024, 1024, 1024, 0.42 * PEAK)]
    eff, knee = fit_knee(points, PEAK)
    assert knee == 0.0 and eff == pytest.approx(0.41)


def test_fit_attention_recovers_efficiency_knee_and_backward_ratio():
    """Synthetic causal-attention rates on the cost model's curve eff / (1 + knee / s), the
    backward at 0.9 of the forward: the fit returns the three values exactly."""
    eff, knee, ratio = 0.55, 400.0, 0.9
    points = [(s, PEAK * eff / (1 + knee / s), PEAK * ratio * eff / (1 + knee / s))
              for s in (512, 1024, 4096)]
    got = fit_attention(points, PEAK)
    assert got == pytest.approx((eff, knee, ratio), rel=1e-9)


def test_fit_attention_without_a_knee_takes_the_longest_length():
    """Short sequences measured faster than long ones (caches, noise): no knee, the longest
    length's forward efficiency and backward ratio."""
    points = [(128, 0.3 * PEAK, 0.3 * PEAK), (256, 0.25 * PEAK, 0.2 * PEAK),
              (512, 0.2 * PEAK, 0.15 * PEAK)]
    assert fit_attention(points, PEAK) == pytest.approx((0.2, 0.0, 0.75))


def test_fit_alpha_beta():
    xs = [1e3, 1e5, 1e6, 1e7]
    a, b = fit_alpha_beta(xs, [20e-6 + x / 2e9 for x in xs])
    assert a == pytest.approx(20e-6, rel=1e-6) and b == pytest.approx(1 / 2e9, rel=1e-6)


def synthetic(bw=1e9, alpha=50e-6, a2a_bw=0.5e9):
    """Measurements a machine with these links would give (rank 0's view)."""
    def ring(n, s):
        return (n - 1) * alpha + (n - 1) / n * s / bw

    def a2a(n, s):
        return (n - 1) * (s / n / a2a_bw + alpha) + alpha

    sizes = [1 << 16, 1 << 20, 1 << 22]
    net = {"all_gather": [(n, s, ring(n, s)) for n in (2, 4) for s in sizes],
           "all_reduce": [(n, s, 2 * ring(n, s)) for n in (2, 4) for s in sizes],
           "all_to_all": [(n, s, a2a(n, s)) for n in (2, 4) for s in sizes]}
    gemm = [(m, m, m, PEAK * 0.5 / (1 + 3 * 32 / m)) for m in (64, 256, 1024)]
    # attention: 0.2 of peak at long sequences, knee 256, backward at 0.8 of the forward
    attention = [(s, PEAK * 0.2 / (1 + 256 / s), PEAK * 0.16 / (1 + 256 / s))
                 for s in (128, 256, 512)]
    compute = {"grouped_kernel": False, "gemm": gemm, "grouped": [], "attention": attention,
               "scan": {"points": scan_points(0.1, 5.0, 40.0), "bwd_ratio": 0.65}, "copy": 10e9,
               "block_host_s": 70e-6,
               "host_us": {"attention": 600.0, "mlp": 250.0,
                           "moe_variants": {"E2": 700.0, "E8": 1000.0, "S": 900.0}}}
    # C = 15 ms of GEMMs beside M = 10 ms of collective: together 15 ms (all hidden), 19 ms
    # (0.6 hidden), 25 ms (serialised)
    overlap = {op: {"compute_s": 15e-3, "collective_s": 10e-3, "both_s": t, "gemms": 6}
               for op, t in (("all_gather", 15e-3), ("reduce_scatter", 19e-3),
                             ("all_to_all", 25e-3))}
    # one rank alone against 4 at once, three rounds in turns: the median ratio is kept
    sharing = [(30.0, 80.0), (25.0, 90.0), (30.0, 70.0)]
    return {"compute": compute, "sharing": sharing, "sharing_ranks": 4, "network": {"intra": net},
            "overlap": overlap, "overlap_ranks": 4}


def test_derive_gives_the_values_the_cost_model_reads():
    cluster = local_cpu(4)
    values, sources = derive(synthetic(), cluster, "fp32")
    assert values["gemm_eff"] == pytest.approx(0.5, rel=1e-6)
    assert values["gemm_knee"] == pytest.approx(32, rel=1e-6)
    assert values["grouped_gemm"] == 0.0
    assert values["attn_eff"] == pytest.approx(0.2) and values["attn_knee"] == pytest.approx(256)
    assert values["attn_bwd_ratio"] == pytest.approx(0.8)
    assert values["scan_eff"] == pytest.approx(0.1)
    assert values["scan_chunk_ns"] == pytest.approx(5.0)
    assert values["scan_token_ns"] == pytest.approx(40.0)
    assert values["scan_bwd_ratio"] == 0.65
    assert values["hbm_eff"] == pytest.approx(10e9 / cluster.device.hbm)
    assert values["kernel_us"] == pytest.approx(70)
    assert (values["host_us_attention"], values["host_us_mlp"]) == (600.0, 250.0)
    # the MoE block at 2 and 8 local experts: 50 us per expert on a block of 600 without them;
    # the shared expert adds 200
    assert values["host_us_moe_expert"] == pytest.approx(50.0)
    assert values["host_us_moe"] == pytest.approx(600.0)
    assert values["host_us_moe_shared"] == pytest.approx(200.0)
    assert values["host_sync"] == 1.0  # the CPU runs its own kernels
    assert values["shared_cores"] == pytest.approx(80 / 30)  # 4 ranks: 80 block passes/s, one 30
    assert values["intra_eff"] == pytest.approx(1e9 / cluster.intra.bandwidth, rel=1e-6)
    assert values["intra_latency_us"] == pytest.approx(50, rel=1e-6)
    assert values["a2a_eff"] == pytest.approx(0.5, rel=1e-6)
    assert values["overlap_all_gather"] == pytest.approx(1.0)
    assert values["overlap_reduce_scatter"] == pytest.approx(0.6)
    assert values["overlap_all_to_all"] == pytest.approx(0.0)
    assert sources["overlap_reduce_scatter"] == ("reduce-scatter over 4 ranks beside 6 GEMMs: alone "
                                                 "10.00 ms and 15.00 ms, together 19.00 ms")
    assert set(sources) == set(values)
    assert all(k in calibration.KEYS for k in values)


def test_derive_measures_each_level_s_all_to_all_on_its_own():
    """Two nodes: the network level's all-to-all efficiency comes from its own measurement."""
    measured = synthetic()
    network = synthetic(bw=0.2e9, alpha=80e-6, a2a_bw=0.15e9)["network"]
    measured["network"]["inter"] = network["intra"]
    values, sources = derive(measured, local_cpu(4), "fp32")
    assert values["a2a_eff"] == pytest.approx(0.5, rel=1e-6)
    assert values["a2a_inter_eff"] == pytest.approx(0.75, rel=1e-6)
    assert values["inter_latency_us"] == pytest.approx(80, rel=1e-6)
    assert "inter-node" in sources["a2a_inter_eff"]


def test_hidden_fraction_is_clipped_to_what_overlap_can_mean():
    point = {"compute_s": 4.0, "collective_s": 2.0}
    assert hidden_fraction({**point, "both_s": 4.0}) == 1.0  # max(C, M): all hidden
    assert hidden_fraction({**point, "both_s": 6.0}) == 0.0  # C + M: serialised
    assert hidden_fraction({**point, "both_s": 5.0}) == 0.5
    assert hidden_fraction({**point, "both_s": 7.5}) == 0.0  # slower than serial (contention)
    assert hidden_fraction({**point, "both_s": 3.0}) == 1.0  # faster than either alone (noise)


def test_one_rank_measures_no_overlap():
    values, sources = derive({**synthetic(), "overlap": {}, "overlap_ranks": 1}, local_cpu(1),
                             "fp32")
    assert not any(k.startswith("overlap_") for k in values)  # the defaults stay


@pytest.mark.tier2
def test_plait_calibrate_local_cpu_end_to_end(tmp_path):
    out = tmp_path / "calib.json"
    assert main(["calibrate", "local-cpu", "--ranks", "2", "-o", str(out)]) == 0
    cal = calibration.read(out)
    values = dict(cal.values)
    for key in ("gemm_eff", "hbm_eff", "attn_eff", "intra_eff", "intra_latency_us", "kernel_us",
                "shared_cores", "a2a_eff", "host_us_attention", "host_us_mlp", "host_us_moe",
                "host_us_mamba", "intra_latency_us_all_reduce", "intra_latency_us_all_gather",
                "intra_latency_us_p2p"):
        assert values[key] > 0, key
    for kind in ("all_gather", "reduce_scatter", "all_to_all", "p2p"):  # 0 on a loaded CPU: a value
        assert 0.0 <= values[f"overlap_{kind}"] <= 1.0
        assert "over 2 ranks beside" in dict(cal.sources)[f"overlap_{kind}"]
    assert values["fsdp_host_us"] >= 0 and 0.0 <= values["overlap_fsdp"] <= 1.0
    assert "fully_shard" in dict(cal.sources)["overlap_fsdp"]
    assert values["cp_host_us_attention"] >= 0 and values["cp_host_us_mamba"] >= 0
    assert values["scan_bwd_ratio"] > 0 and values["scan_eff"] > 0
    assert values["scan_chunk_ns"] >= 0 and values["scan_token_ns"] >= 0
    # differences of two timings, clamped at 0: a slow phase over one variant can leave either 0
    assert values["host_us_moe_expert"] >= 0 and values["host_us_moe_shared"] >= 0
    assert 0 < values["intra_latency_us_all_gather_synced"] <= values["intra_latency_us_all_gather"]
    assert "3 interleaved rounds" in dict(cal.sources)["shared_cores"]
    doc = json.loads(out.read_text())
    assert doc["measurements"]["network"]["intra"]["all_gather"]
    assert set(doc["measurements"]["overlap"]) == {"all_gather", "reduce_scatter", "all_to_all",
                                                   "p2p"}
    # a second run refuses to overwrite a file that is not a calibration
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    assert main(["calibrate", "local-cpu", "--ranks", "2", "-o", str(other)]) == 2


def test_derive_takes_the_latency_training_pays_from_the_in_situ_calls():
    """Calls between compute slices add 2 ms each (all-gather, one latency term on a pair), 3 ms
    (all-reduce, two terms: 1.5 ms each) and 1.2 ms (a ring exchange, one term) less their bytes'
    time at the fitted 1 GB/s; the bare back-to-back fit (50 us) is kept only in the
    explanation. Each op keeps its own; intra_latency_us is the collectives' median."""
    measured = synthetic()
    point = {"bare_s": 0.3e-3, "insitu_s": 0.0, "slice_s": 1e-3}
    measured["network"]["intra_insitu"] = [(2, {
        "all_gather": {**point, "bytes": 2e6, "added_s": 2e-3 + 1e-3},  # 1e6 bytes at 1 GB/s
        "all_reduce": {**point, "bytes": 1e6, "added_s": 3e-3 + 1e-3},
        "p2p": {**point, "bytes": 1e6, "added_s": 1.2e-3 + 1e-3}})]  # every byte sent: 1 ms
    values, sources = derive(measured, local_cpu(4), "fp32")
    assert values["intra_latency_us"] == pytest.approx(1750, rel=1e-6)  # median of 2 and 1.5 ms
    assert values["intra_latency_us_all_gather"] == pytest.approx(2000, rel=1e-6)
    assert values["intra_latency_us_all_reduce"] == pytest.approx(1500, rel=1e-6)
    assert values["intra_latency_us_p2p"] == pytest.approx(1200, rel=1e-6)
    assert "bare back to back: 50.0 us" in sources["intra_latency_us"]
    assert "p2p 1200" in sources["intra_latency_us_p2p"]
    assert values["intra_eff"] == pytest.approx(1e9 / local_cpu(4).intra.bandwidth, rel=1e-6)
    assert set(sources) == set(values) and all(k in calibration.KEYS for k in values)


def test_insitu_latency_takes_each_op_s_median_over_group_sizes():
    """Pairs and quads: an all-gather of 4 pays 3 terms, an all-reduce of 4 six; the per-op value
    is the median over the sizes, the bytes' time taken off first (zero bytes here)."""
    def pt(added):
        return {"bytes": 0, "added_s": added, "bare_s": 0.0, "insitu_s": 0.0, "slice_s": 0.0}
    got = insitu_latency([(2, {"all_gather": pt(1e-3), "all_reduce": pt(3e-3), "p2p": pt(2e-3)}),
                          (4, {"all_gather": pt(6e-3), "all_reduce": pt(6e-3), "p2p": pt(4e-3)})],
                         1e9)
    per_op = dict(got.per_op)
    assert per_op["all_gather"] == pytest.approx((1e-3 + 2e-3) / 2)  # 1 ms / 1, 6 ms / 3
    assert per_op["all_reduce"] == pytest.approx((1.5e-3 + 1e-3) / 2)  # 3 ms / 2, 6 ms / 6
    assert per_op["p2p"] == pytest.approx(3e-3)  # one term per exchange at any size
    assert got.alpha == pytest.approx(statistics.median([1e-3, 2e-3, 1.5e-3, 1e-3]))
