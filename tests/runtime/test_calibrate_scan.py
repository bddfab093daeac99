"""plait calibrate's SSD scan law (runtime/calibrate_scan.py): the fit recovers a rate and the eager
scan's elementwise terms from timings that follow it, and drops a term the points contradict."""
import pytest

from plait.runtime.calibrate_scan import fit_scan, flops_per_token_head

PEAK = 100e9

SCAN_SHAPES = [(512, 4, 32, 16, 64), (512, 4, 16, 16, 32), (512, 4, 32, 32, 64), (512, 4, 64, 64, 128)]


def scan_points(eff: float, chunk_ns: float, token_ns: float) -> list[tuple]:
    """Forward times of SCAN_SHAPES under runtime/calibrate_scan.py's law."""
    out = []
    for seq, h, p, n, l in SCAN_SHAPES:
        per = flops_per_token_head(seq, h, p, n, l) / (eff * PEAK) + (chunk_ns * l + token_ns) * 1e-9
        out.append((seq, h, p, n, l, per * seq * h))
    return out


def test_fit_scan_recovers_the_law_and_drops_a_term_the_points_do_not_show():
    assert fit_scan(scan_points(0.2, 3.0, 25.0), PEAK) == pytest.approx((0.2, 3.0, 25.0))
    # a fused scan: no elementwise terms, the rate alone
    assert fit_scan(scan_points(0.5, 0.0, 0.0), PEAK) == pytest.approx((0.5, 0.0, 0.0), abs=1e-9)
    # a point slower than the law makes no term negative; one faster at long chunks would: dropped
    faster = [(*p[:5], p[5] * (0.7 if p[4] == 128 else 1.0)) for p in scan_points(0.2, 3.0, 25.0)]
    eff, chunk_ns, token_ns = fit_scan(faster, PEAK)
    assert eff > 0 and chunk_ns >= 0 and token_ns >= 0


def test_measure_scan_times_the_scan_the_runtime_binds(monkeypatch):
    """The probe runs runtime/kernels.py's choice for ssd_scan (mamba-ssm's fused scan on a GPU
    that has it), not plait's chunked scan regardless."""
    import torch

    from plait.runtime import calibrate_scan, kernels

    real = kernels.select("ssd_scan", "cpu")
    calls = []

    def counted(*args):
        calls.append(args[-1])
        return real.fn(*args)

    chosen = kernels.Choice("ssd_scan", "a bound scan", True, "test", counted)
    monkeypatch.setattr(calibrate_scan.kernels, "select", lambda op, device, fp8=False: chosen)
    got = calibrate_scan.measure_scan([(64, 2, 8, 4, 16), (64, 2, 8, 4, 32)], torch.float32,
                                      torch.device("cpu"))
    assert got["kernel"] == "a bound scan"
    assert set(calls) == {16, 32}  # both shapes' forwards and the first's backward ran through it
    assert [p[4] for p in got["points"]] == [16, 32] and got["bwd_ratio"] > 0

