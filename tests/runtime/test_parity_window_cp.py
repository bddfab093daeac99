"""Tier 2: sliding-window attention under context parallelism reproduces one device (gloo).

tiny-dense with a 5-token window on three of its four attention layers (layer 1 keeps full
attention, as Qwen2's bottom layers do), seq 32 over cp = 2: zigzag chunks of 8 tokens, so every
kind of chunk pair occurs — banded diagonal pairs, banded earlier chunks, chunks wholly outside the
window (skipped), and the full layer's causal and whole pairs. Ring and all-to-all CP, one spawn.
Tolerance as test_parity_hybrid_cp: loss and every gradient after one step within 1e-5 in fp32.
"""
from dataclasses import replace

import pytest

from plait.ir.dsl import load_model
from plait.ir.plan import Layout
from plait.runtime.harness.parity import Case, Setup, run_parity

DENSE = load_model("specs/models/tiny-dense.plait")
SPEC = replace(DENSE, attention=replace(DENSE.attention, window=5, full_layers=(1,)))
SETUP = Setup(SPEC, global_batch=4, seq=32, steps=1)
FP32_TOL = 1e-5

CASES = [
    Case("cp2_ring_window", Layout(cp=2, dp_kind="replicated")),
    Case("cp2_alltoall_window", Layout(cp=2, cp_comm="alltoall", dp_kind="replicated")),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_parity(SETUP, CASES, str(tmp_path_factory.mktemp("window2")))


@pytest.mark.tier2
@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_windowed_cp_matches_one_device(results, name):
    assert results[name].loss < FP32_TOL, results[name]
    assert results[name].grads < FP32_TOL, results[name]
