"""Tier 2: tensor-parallel Mamba and context parallelism reproduce one device (gloo).

The model is tiny-hybrid (Mamba2, attention, ReLU² MLP) with RoPE switched on in its attention
layers, so one model exercises TP-sharded Mamba mixers, ring / all-to-all attention, RoPE positions
of zigzag chunks, Mamba conv halos and scan-state passing.

Each layout runs in fp32 and in fp64 in one spawn (the argument is test_runtime_parity's):
fp32: loss and every gradient after one step equal the reference within 1e-5 (measured ~2e-7).
fp64 (reference and ranks in float64, rounding out of the way): loss and gradients within 1e-12
and parameters after the 2 AdamW steps within 1e-9 (measured ~1e-15 and ~6e-13), which pins the
whole step (reductions over dp-cp, clipping, AdamW) down exactly. fp32 parameters are not compared:
Adam's nearly scale-free update turns the ~1e-9 rounding of a tiny gradient (a token seen once)
into up to ~lr * 1e-9 / eps = 1e-4 (3e-4 measured after 2 steps).
"""
from dataclasses import replace

import pytest
import torch

from plait.ir.dsl import load_model
from plait.ir.model import Rope
from plait.ir.plan import Layout
from plait.runtime.harness.parity import FP64, Case, Setup, in_fp32_and_fp64, run_parity

HYBRID = load_model("specs/models/tiny-hybrid.plait")
SPEC = replace(HYBRID, attention=replace(HYBRID.attention, rope=Rope(theta=10000.0)))
SETUP = Setup(SPEC, global_batch=4, seq=32, steps=2)
FP32_TOL = 1e-5  # loss and gradients
FP64_TOL = {"loss": 1e-12, "grads": 1e-12, "params": 1e-9}

WORLD2 = [
    Case("tp2_mamba", Layout(tp=2, dp_kind="replicated")),
    Case("cp2_ring_full_recompute", Layout(cp=2, recompute="full")),  # the ring runs again
]
WORLD4 = [
    Case("tp2_pp2_mamba", Layout(tp=2, pp=2, sp=True)),
    Case("cp4_ring", Layout(cp=4)),
    Case("cp2_tp2_sp", Layout(cp=2, tp=2, sp=True)),
    Case("cp2_dp2_fsdp", Layout(cp=2, dp=2, dp_kind="fsdp")),
    Case("cp2_pp2_alltoall", Layout(cp=2, pp=2, cp_comm="alltoall")),
]

# fp64 only
WORLD2_FP64 = [
    Case("cp2_ring", Layout(cp=2, dp_kind="replicated"), dtype=torch.float64),
    Case("cp2_alltoall_fsdp", Layout(cp=2, cp_comm="alltoall", dp_kind="fsdp"), dtype=torch.float64),
]


def _check(results, name):
    fp32, fp64 = results[name], results[f"{name} {FP64}"]
    assert fp32.loss < FP32_TOL, fp32
    assert fp32.grads < FP32_TOL, fp32
    _check_fp64(results, f"{name} {FP64}")


def _check_fp64(results, name):
    for what, tol in FP64_TOL.items():
        assert getattr(results[name], what) < tol, results[name]


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    cases = in_fp32_and_fp64(WORLD2) + WORLD2_FP64
    return run_parity(SETUP, cases, str(tmp_path_factory.mktemp("hybrid2")))


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return run_parity(SETUP, in_fp32_and_fp64(WORLD4), str(tmp_path_factory.mktemp("hybrid4")))


@pytest.mark.tier2
class TestHybridTwoRanks:
    @pytest.mark.parametrize("name", [c.name for c in WORLD2])
    def test_matches_one_device(self, world2, name):
        _check(world2, name)


@pytest.mark.tier2
class TestHybridFourRanks:
    @pytest.mark.parametrize("name", [c.name for c in WORLD4])
    def test_matches_one_device(self, world4, name):
        _check(world4, name)


@pytest.mark.tier2
class TestHybridTwoRanksFloat64:
    @pytest.mark.parametrize("name", [c.name for c in WORLD2_FP64])
    def test_matches_one_device_to_rounding(self, world2, name):
        _check_fp64(world2, name)
