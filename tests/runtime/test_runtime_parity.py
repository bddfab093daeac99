"""Tier 2: every parallel layout reproduces one device (gloo), each layout run twice in one spawn.

fp32 (the dtype training runs in): the loss and every gradient after one step (after the TP / DP
reductions) equal the single-device reference within 1e-5; the measured differences are ~1e-7,
the rounding of sums the layout reorders.

fp64 (reference and ranks in float64): the loss and every gradient within 1e-12 and the parameters
after 3 AdamW steps (lr 1e-3, warmup, cosine, clipping at 0.5, weight decay) within 1e-9; measured
~1e-16 and ~1e-14. This pins the whole step down (reductions, clipping, LR, AdamW, ZeRO-1 shards,
FSDP): a real defect (a missed or doubled reduction, a wrong divisor or clip factor, a stale shard)
moves parameters by a fraction of one update, >= 1e-6. Parameters are not compared in fp32: Adam's
update lr * m / (sqrt(v) + eps) has a derivative up to ~1 / eps = 1e8 in the gradient, so the ~1e-9
rounding of an entry's tiny gradient moves that entry by up to ~lr * 1e-9 / eps = 1e-4 (1.1e-5 is
measured, and it changes with the reference's thread count); in fp64 the same bound is
~lr * 1e-16 / eps = 1e-11.

One process spawn per world size runs all of that size's layouts in both dtypes. Recompute (full,
selective) changes nothing numerically; a tied embedding under PP keeps identical copies.
"""
from dataclasses import replace

import pytest

from plait.ir.model import MLP, Attention, ModelSpec, Rope
from plait.ir.plan import Layout, Stage
from plait.runtime.harness.parity import FP64, Case, Setup, in_fp32_and_fp64, run_parity

# Every optional dense feature the passes must handle: GQA, RoPE, qkv / out / mlp biases, q/k norms.
SPEC = ModelSpec(
    name="parity", vocab=256, hidden=64, layers=("attention", "mlp") * 3,
    attention=Attention(heads=4, kv_heads=2, head_dim=16, rope=Rope(), qk_norm=True,
                        qkv_bias=True, out_bias=True),
    mlp=MLP(ffn=96, bias=True))
SETUP = Setup(SPEC, global_batch=8, seq=16, steps=3)
FP32_TOL = 1e-5  # loss and gradients
FP64_TOL = {"loss": 1e-12, "grads": 1e-12, "params": 1e-9}
UNEVEN = (Stage(0, 0, 0, 4), Stage(1, 0, 4, 6))  # 4 + 2 layers

WORLD2 = [
    Case("tp2", Layout(tp=2, dp_kind="replicated")),
    Case("tp2_sp", Layout(tp=2, sp=True)),
    Case("pp2_1f1b_uneven", Layout(pp=2), stages=UNEVEN),
    Case("pp2_vpp2_interleaved", Layout(pp=2, vpp=2), schedule="interleaved"),  # 2+2+1+1 layers
    Case("dp2_replicated", Layout(dp=2, dp_kind="replicated")),
    Case("dp2_zero1", Layout(dp=2, dp_kind="zero1")),
    Case("dp2_fsdp", Layout(dp=2, dp_kind="fsdp")),
    Case("tp2_sp_recompute_full", Layout(tp=2, sp=True, recompute="full")),  # collectives re-run
]
# Tied embeddings under PP: the last stage's copy, summed over the embedding group.
TIED_SETUP = replace(SETUP, spec=replace(SPEC, name="parity-tied", tie_embeddings=True))
TIED = [
    Case("pp2_tied", Layout(pp=2)),
    Case("pp2_vpp2_tied_fsdp_selective", Layout(pp=2, vpp=2, dp_kind="fsdp", recompute="selective"),
         schedule="interleaved"),
]
WORLD4 = [
    Case("tp2_pp2_sp_uneven", Layout(tp=2, pp=2, sp=True), stages=(Stage(0, 0, 0, 2), Stage(1, 0, 2, 6))),
    Case("tp2_dp2_fsdp_sp", Layout(tp=2, dp=2, sp=True, dp_kind="fsdp")),
]
WORLD8 = [
    Case("tp2_dp2_pp2_zero1_sp", Layout(tp=2, dp=2, pp=2, sp=True, dp_kind="zero1")),
    Case("tp2_dp2_pp2_vpp2_fsdp_sp", Layout(tp=2, dp=2, pp=2, vpp=2, sp=True, dp_kind="fsdp",
                                           mbs=2), schedule="interleaved"),
]


def _check(results, name):
    fp32, fp64 = results[name], results[f"{name} {FP64}"]
    assert fp32.loss < FP32_TOL, fp32
    assert fp32.grads < FP32_TOL, fp32
    for what, tol in FP64_TOL.items():
        assert getattr(fp64, what) < tol, fp64
    assert fp32.copies == fp64.copies == 0.0, (fp32, fp64)  # tied copies stay identical


def _results(tmp_path_factory, cases, tag, setup=SETUP):
    return run_parity(setup, in_fp32_and_fp64(cases), str(tmp_path_factory.mktemp(tag)))


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return _results(tmp_path_factory, WORLD2, "parity2")


@pytest.fixture(scope="module")
def tied2(tmp_path_factory):
    return _results(tmp_path_factory, TIED, "tied2", TIED_SETUP)


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return _results(tmp_path_factory, WORLD4, "parity4")


@pytest.fixture(scope="module")
def world8(tmp_path_factory):
    return _results(tmp_path_factory, WORLD8, "parity8")


@pytest.mark.tier2
class TestTwoRanks:
    @pytest.mark.parametrize("name", [c.name for c in WORLD2])
    def test_matches_one_device(self, world2, name):
        _check(world2, name)


@pytest.mark.tier2
class TestFourRanks:
    @pytest.mark.parametrize("name", [c.name for c in WORLD4])
    def test_matches_one_device(self, world4, name):
        _check(world4, name)


@pytest.mark.tier2
class TestEightRanks:
    @pytest.mark.parametrize("name", [c.name for c in WORLD8])
    def test_matches_one_device(self, world8, name):
        _check(world8, name)


@pytest.mark.tier2
class TestTiedPipeline:
    @pytest.mark.parametrize("name", [c.name for c in TIED])
    def test_matches_one_device(self, tied2, name):
        _check(tied2, name)
