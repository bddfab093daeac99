"""The aux-loss-free bias update on one device: blocks found, the hand formula, counters reset,
the axes summed over (the multi-rank equality with the reference is tier 2:
tests/lowering/test_moe_parity_dist.py)."""
from dataclasses import replace
from pathlib import Path

import torch

from plait.ir.dsl import load_model
from plait.ir.plan import Layout
from plait.lowering.build import build_model
from plait.runtime.mesh import Mesh
from plait.runtime.moe_balance import bias_blocks, token_axes, update_expert_biases

ROOT = Path(__file__).resolve().parents[2]
SPEC = load_model(str(ROOT / "specs/models/tiny-moe.plait"))


def test_update_matches_the_hand_formula_and_resets_the_load():
    spec = replace(SPEC, moe=replace(SPEC.moe, expert_bias=True))
    model = build_model(spec, seed=0)
    blocks = bias_blocks([model])
    assert len(blocks) == spec.layers.count("moe") == 3
    model(torch.randint(0, spec.vocab, (2, 16)), torch.randint(0, spec.vocab, (2, 16)))
    loads = [b.expert_load.clone() for b in blocks]
    assert all(int(l.sum()) == 2 * 16 * spec.moe.top_k for l in loads)  # every token, k choices
    assert update_expert_biases([model], 0.25) == 3
    for b, load in zip(blocks, loads):
        mean = float(load.sum()) / len(load)
        want = torch.tensor([0.25 * ((mean > x) - (mean < x)) for x in load.tolist()])
        assert torch.equal(b.expert_bias, want)
        assert b.expert_load.sum() == 0


def test_models_without_expert_bias_are_left_alone():
    assert update_expert_biases([build_model(SPEC, seed=0)], 0.25) == 0


def test_load_is_summed_over_the_stage_token_axes():
    def mesh(tp, dp):
        lay = Layout(tp=tp, dp=dp, sp=tp > 1)
        members = {"tp": tuple(range(tp)), "dp-cp": tuple(range(0, tp * dp, tp))}
        return Mesh(rank=0, world=tp * dp, layout=lay, timeout_s=1.0, members=members)
    assert token_axes(mesh(1, 1)) == ()
    assert token_axes(mesh(1, 4)) == ("dp-cp",)
    assert token_axes(mesh(2, 2)) == ("tp", "dp-cp")
