"""`plait calibrate`'s runtime-op probes (runtime/calibrate_ops.py) and what derive makes of
them: synthetic numbers with known answers, and the probes run once on tiny sizes (no timing
assertions: only that they return a rate)."""
import pytest
import torch

from plait.ir.cluster import local_cpu
from plait.ir import counts
from plait.planner.cost.compute import BWD_MEMORY
from plait.runtime.calibrate_cost import derive, fit_knee, memory_efficiency
from plait.runtime.calibrate_ops import elementwise_rate, gemm_seconds, linear_rates

from test_calibrate_cost import PEAK, synthetic


def test_overhead_comes_off_the_linear_time():
    assert gemm_seconds(1.0e-3, 0.2e-3) == pytest.approx(0.8e-3)


def test_a_time_near_the_overhead_keeps_half():
    """Noise, not arithmetic: the difference would be near zero and the rate unbounded."""
    assert gemm_seconds(0.25e-3, 0.2e-3) == pytest.approx(0.125e-3)


def test_knee_fit_of_overhead_free_linears():
    """A linear's forward + backward is 6 m n k FLOPs at one efficiency curve: the rates the
    probe reports (overhead taken off) give back that curve."""
    eff, knee, overhead = 0.55, 20.0, 90e-6
    shapes = [(64, 256, 128), (128, 256, 128), (256, 256, 512), (512, 512, 512), (32, 512, 512)]
    points = []
    for m, n, k in shapes:
        flops = 6.0 * m * n * k
        seconds = overhead + flops / (PEAK * eff / (1 + knee * (1 / m + 1 / n + 1 / k)))
        points.append((m, n, k, flops / gemm_seconds(seconds, overhead)))
    got_eff, got_knee = fit_knee(points, PEAK)
    assert got_eff == pytest.approx(eff, rel=1e-6) and got_knee == pytest.approx(knee, rel=1e-6)


def test_cpu_memory_efficiency_is_the_runtime_modules_rate():
    dev = local_cpu(2).device
    c = {"copy": 18e9, "elementwise": 6e9}
    eff, how = memory_efficiency(c, dev)
    assert eff == pytest.approx(6e9 / dev.hbm)
    assert "6.00 GB/s" in how and "a copy: 18.0" in how
    assert memory_efficiency({"copy": 18e9}, dev)[0] == pytest.approx(18e9 / dev.hbm)


def test_an_accelerator_keeps_the_copy():
    from dataclasses import replace
    dev = replace(local_cpu(2).device, name="h100-sxm")
    assert memory_efficiency({"copy": 3e12, "elementwise": 1e12}, dev)[0] == pytest.approx(
        3e12 / dev.hbm)


def test_derive_reads_the_elementwise_rate_on_the_cpu():
    measured = synthetic()
    measured["compute"]["elementwise"] = 5e9
    values, sources = derive(measured, local_cpu(4), "fp32")
    assert values["hbm_eff"] == pytest.approx(5e9 / local_cpu(4).device.hbm)
    assert "norm, activation and residual add" in sources["hbm_eff"]


def test_probe_bytes_are_the_cost_model_s():
    """The elementwise probe counts norm + residual + SwiGLU bytes with the cost model's own
    functions: 2 + 3 stream passes and 3 activation widths, the backward BWD_MEMORY times."""
    norm, residual = counts.norm_residual_traffic(10, 8, 4)
    assert (norm, residual) == (2 * 10 * 8 * 4, 3 * 10 * 8 * 4)
    assert counts.activation_fn_traffic(10, 16, 8, 4) == 10 * 24 * 4
    assert BWD_MEMORY == 2.0


def test_probes_run_on_tiny_sizes():
    rates = linear_rates([(8, 16, 8)], torch.float32, torch.device("cpu"))
    assert rates[0][:3] == (8, 16, 8) and rates[0][3] > 0
    assert elementwise_rate(8, 16, torch.float32, torch.device("cpu")) > 0


def test_a_size_s_groups_cover_the_node_at_once():
    from plait.runtime.calibrate_cost import intra_groups
    assert intra_groups(4) == [[[0, 1], [2, 3]], [[0, 1, 2, 3]]]
    assert intra_groups(2) == [[[0, 1]]]
    assert intra_groups(6) == [[[0, 1], [2, 3], [4, 5]], [[0, 1, 2, 3]], [list(range(6))]]
