"""Tier 2: tensor-parallel Mamba and context parallelism reproduce one device (gloo).

The model is tiny-hybrid (Mamba2, attention, ReLU² MLP) with RoPE switched on in its attention
layers, so one model exercises TP-sharded Mamba mixers, ring / all-to-all attention, RoPE positions
of zigzag chunks, Mamba conv halos and scan-state passing.

fp32: loss and every gradient after one step equal the reference within 1e-5. Parameters after the
AdamW step only within one learning-rate step (1e-3): Adam's update lr * m / (sqrt(v) + eps) is
nearly scale-free, so an entry whose gradient is tiny (a token seen once: 2e-7) moves by ~lr
whatever its size, and ~1e-9 rounding differences of reordered fp32 sums shift such moves by up to
~5e-4 (the single-rank compiled program alone shows 3e-6).
fp64 (reference and ranks in float64, rounding out of the way): gradients within 1e-12 and
parameters after the 2 steps within 1e-9, which pins the whole step (reductions over dp-cp,
clipping, AdamW) down exactly.
"""
from dataclasses import replace

import pytest
import torch

from plait.ir.dsl import load_model
from plait.ir.model import Rope
from plait.ir.plan import Layout
from plait.runtime.parity import Case, Setup, run_parity

HYBRID = load_model("specs/models/tiny-hybrid.plait")
SPEC = replace(HYBRID, attention=replace(HYBRID.attention, rope=Rope(theta=10000.0)))
SETUP = Setup(SPEC, global_batch=4, seq=32, steps=1)
SETUP64 = Setup(SPEC, global_batch=4, seq=32, steps=2, dtype=torch.float64)

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

WORLD2_FP64 = [
    Case("cp2_ring_fp64", Layout(cp=2, dp_kind="replicated")),
    Case("cp2_alltoall_fsdp_fp64", Layout(cp=2, cp_comm="alltoall", dp_kind="fsdp")),
]


def _check(results, name, loss=1e-5, grads=1e-5, params=1e-3):
    errors = results[name]
    assert errors.loss < loss, errors
    assert errors.grads < grads, errors
    assert errors.params < params, errors


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return run_parity(SETUP, WORLD2, str(tmp_path_factory.mktemp("hybrid2")))


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return run_parity(SETUP, WORLD4, str(tmp_path_factory.mktemp("hybrid4")))


@pytest.fixture(scope="module")
def world2_fp64(tmp_path_factory):
    return run_parity(SETUP64, WORLD2_FP64, str(tmp_path_factory.mktemp("hybrid2_64")))


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
    def test_matches_one_device_to_rounding(self, world2_fp64, name):
        # the runtime averages the reported loss over micro-batches in an fp32 accumulator
        _check(world2_fp64, name, loss=1e-7, grads=1e-12, params=1e-9)
