"""The attention core's efficiency against the kernel's sequence length (compute.attention_eff,
the attention kind's kernel_keys) and the context-parallel ring's overlap with it (overlap_p2p),
and the Hopper specs' values against the kernel micro-benchmarks they come from."""
import sys
from pathlib import Path

import pytest

from plait.ir import counts
from plait.ir.dsl import load_file
from plait.ir.plan import Layout
from plait.kinds.attention import cost as attention_cost
from plait.kinds.mamba import cost as mamba_cost
from plait.planner.cost import compute
from plait.planner.cost.context import Calibration, Context

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import attention_kernels  # noqa: E402  (benchmarks/attention_kernels.py: the published points)
from cost_util import calibrated  # noqa: E402

HOPPER = ("h100-sxm5-80gb", "h200-sxm-141gb", "h800-sxm5-80gb")


def core_seconds_per_flop(job, layout):
    ctx = Context(job, layout)
    flops = ctx.tokens * counts.attention_core_flops(job.model, job.seq_len) / layout.tp
    return attention_cost.work(ctx).core / flops, ctx


@pytest.mark.parametrize("cp", [1, 2, 4, 8])
def test_core_runs_at_the_formula_for_the_length_one_ring_step_sees(mixtral_job, cp):
    """Ring CP: each kernel call sees seq_len / cp; its seconds per FLOP are 1 / (peak x
    attn_eff / (1 + attn_knee / (seq_len / cp)))."""
    job = calibrated(mixtral_job(seq_len=32768), attn_eff=0.6, attn_knee=400.0)
    per_flop, ctx = core_seconds_per_flop(job, Layout(tp=2, cp=cp, dp=64 // cp, mbs=1))
    eff = 0.6 / (1 + 400.0 / (32768 / cp))
    assert per_flop == pytest.approx(1 / (ctx.peak_bf16 * eff), rel=1e-12)


def test_core_efficiency_falls_with_short_kernels(mixtral_job):
    job = calibrated(mixtral_job(seq_len=32768), attn_eff=0.6, attn_knee=400.0)
    rates = [1 / core_seconds_per_flop(job, Layout(tp=1, cp=cp, dp=128 // cp, mbs=1))[0]
             for cp in (1, 2, 4, 8, 16)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    # Ulysses CP computes whole sequences of fewer heads: the full length's rate
    ulysses = Layout(tp=1, cp=8, dp=16, mbs=1, cp_comm="alltoall")
    assert 1 / core_seconds_per_flop(job, ulysses)[0] == pytest.approx(rates[0], rel=1e-12)


def test_no_knee_keeps_the_length_independent_rate(mixtral_job):
    """attn_knee 0 (every device nobody measured): the core at attn_eff at any length."""
    assert Calibration().attn_knee == 0.0
    cal = Calibration(attn_eff=0.5)
    assert compute.attention_eff(cal, 128) == compute.attention_eff(cal, 1 << 20) == 0.5
    for cp in (1, 8):
        per_flop, ctx = core_seconds_per_flop(mixtral_job(seq_len=32768),
                                              Layout(tp=1, cp=cp, dp=128 // cp, mbs=1))
        assert per_flop == pytest.approx(1 / (ctx.peak_bf16 * ctx.cal.attn_eff), rel=1e-12)


def test_mamba_scan_has_no_knee(nemotron_job):
    """The SSD scan's chunks have a fixed length: attn_knee leaves it alone."""
    lay = Layout(tp=1, cp=4, dp=2, mbs=1)
    plain = mamba_cost.work(Context(nemotron_job(seq_len=16384), lay))
    kneed = mamba_cost.work(Context(calibrated(nemotron_job(seq_len=16384), attn_knee=400.0), lay))
    assert kneed.core == plain.core


def test_ring_hides_overlap_p2p_of_the_shorter_of_ring_and_core(mixtral_job):
    """The CP ring's exposed seconds: ring - overlap_p2p x min(ring, core) forward, twice the ring
    under the backward core."""
    lay = Layout(tp=1, cp=8, dp=16, mbs=1)
    base = mixtral_job(seq_len=32768)
    ring = attention_cost.cp_comm(Context(base, lay))
    for eff in (0.0, 0.5, 1.0):
        for core in (0.2 * ring, 3.0 * ring):
            ctx = Context(calibrated(base, overlap_p2p=eff), lay)
            work = compute.Work(core=core, core_bwd_rate=0.8)
            fwd, bwd = attention_cost.comm(ctx, work)
            assert fwd["cp"] == pytest.approx(ring - eff * min(ring, core))
            assert bwd["cp"] == pytest.approx(2 * ring - eff * min(2 * ring, 2.5 * core / 0.8))


@pytest.mark.parametrize("device", HOPPER)
def test_hopper_specs_reproduce_the_cudnn_kernel_benchmarks(device):
    """attn_eff / attn_knee / attn_bwd_ratio of the Hopper specs give cuDNN's published causal
    rates (FlashAttention-3, Figures 5-6) within 5% at every length from 512 to 16K."""
    dev = load_file(ROOT / "specs" / "devices" / f"{device}.plait").devices[device]
    cal = Calibration.of(dev)
    peak = dev.peak_flops("bf16")
    for s, fwd, bwd in zip(attention_kernels.LENGTHS, attention_kernels.CUDNN_FWD,
                           attention_kernels.CUDNN_BWD):
        rate = peak * compute.attention_eff(cal, s) / 1e12
        assert rate == pytest.approx(fwd, rel=0.05), s
        assert rate * cal.attn_bwd_ratio == pytest.approx(bwd, rel=0.05), s


def test_spec_values_are_the_fit_of_the_published_points():
    """The H100 spec holds benchmarks/attention_kernels.py's fit, rounded."""
    dev = load_file(ROOT / "specs" / "devices" / "h100-sxm5-80gb.plait").devices["h100-sxm5-80gb"]
    cal = Calibration.of(dev)
    eff, knee, ratio = attention_kernels.fit_attention(
        attention_kernels.points(attention_kernels.CUDNN_FWD, attention_kernels.CUDNN_BWD),
        dev.peak_flops("bf16"))
    assert cal.attn_eff == pytest.approx(eff, abs=0.005)
    assert cal.attn_knee == pytest.approx(knee, abs=0.5)
    assert cal.attn_bwd_ratio == pytest.approx(ratio, abs=0.005)


def test_explanation_names_the_ring_overlap_and_its_source(mixtral_job):
    """A ring-CP plan's explanation says how much of the K/V exchange the core hides and where
    the value comes from; Ulysses and cp 1 have no ring to explain."""
    from plait.planner.explain import overlap_facts
    job = mixtral_job(seq_len=32768)
    ring = overlap_facts(job, Layout(tp=1, cp=8, dp=16, mbs=1))
    assert ring == ["context-parallel ring hidden behind the attention core, of the time they "
                    "overlap: K/V sends 0.84 (default: compute runs 18.9% slower beside NCCL, "
                    "Lee et al. 2025)"]
    measured = overlap_facts(calibrated(job, overlap_p2p=0.3), Layout(tp=1, cp=8, dp=16, mbs=1))
    assert measured[0].endswith("K/V sends 0.30 (device calibration)")
    assert overlap_facts(job, Layout(tp=1, cp=8, dp=16, mbs=1, cp_comm="alltoall")) == []
    assert overlap_facts(job, Layout(tp=1, cp=1, dp=128, mbs=1)) == []
