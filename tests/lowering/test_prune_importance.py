"""Importance estimation: scores describe the model, aggregate as Minitron's (mean over the sequence,
L2 over the batch), and structures planted to be useless score zero and rank last."""
import pytest
import torch

from plait.lowering.build import build_model
from plait.lowering.prune.importance import activation_scores, magnitude_scores
from plait.planner.prune.scores import check_scores, top_indices
from prune_util import DENSE, HYBRID, MOE

torch.set_num_threads(1)
GEN = torch.Generator().manual_seed(0)
BATCHES = [torch.randint(0, 64, (3, 12), generator=GEN) for _ in range(2)]


@pytest.mark.parametrize("spec", [DENSE, HYBRID, MOE], ids=lambda s: s.name)
def test_scores_describe_the_model(spec):
    model = build_model(spec, dtype=torch.float64)
    for scores in (activation_scores(model, spec, BATCHES), magnitude_scores(model, spec)):
        check_scores(scores, spec)
        assert min(scores.hidden) >= 0 and all(min(s.units) >= 0 for s in scores.layers)
    assert activation_scores(model, spec, BATCHES).tokens == 72


def test_ffn_scores_aggregate_mean_over_sequence_then_l2_over_batch():
    model = build_model(DENSE, dtype=torch.float64)
    seen = []
    handle = model.layers[1].mixer.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    scores = activation_scores(model, DENSE, BATCHES)
    handle.remove()
    acts = torch.cat(seen)  # [6, 12, 48]: both batches' rows
    expected = acts.abs().mean(dim=1).square().sum(dim=0).sqrt()
    torch.testing.assert_close(torch.tensor(scores.layers[1].units, dtype=torch.float64), expected)


@torch.no_grad()
def test_planted_useless_structures_score_zero():
    model = build_model(HYBRID, dtype=torch.float64)
    mamba, attn, mlp = model.layers[0].mixer, model.layers[3].mixer, model.layers[1].mixer
    mamba.in_proj.weight[32 + 8:32 + 16] = 0  # the x rows of head 1: its x segment is zero
    attn.v_proj.weight[:8] = 0  # kv group 0: query heads 0 and 1 read zero values
    mlp.up_proj.weight[5] = 0  # relu2(0) = 0: ffn neuron 5 never fires
    model.layers[2].mixer.out_proj.weight.zero_()  # layer 2 becomes the identity
    for layer in model.layers:
        layer.norm.weight[7] = 0
    model.final_norm.weight[7] = 0  # embedding channel 7 reads zero in every norm
    s = activation_scores(model, HYBRID, BATCHES)
    assert s.layers[0].units[1] == 0 and min(s.layers[0].units[0], s.layers[0].units[2]) > 0
    assert s.layers[3].units[:2] == (0.0, 0.0) and min(s.layers[3].units[2:]) > 0
    assert s.layers[1].units[5] == 0 and 5 not in top_indices(s.layers[1].units, 31)
    assert s.layers[2].block == pytest.approx(0, abs=1e-12) and min(l.block for l in s.layers if l.layer != 2) > 1e-6
    assert s.hidden[7] == 0 and 7 not in top_indices(s.hidden, 31)
    depth = activation_scores(model, HYBRID, BATCHES, depth="perplexity")
    assert depth.layers[2].block == 0 and max(l.block for l in depth.layers) > 0


@torch.no_grad()
def test_experts_never_routed_score_zero():
    model = build_model(MOE, dtype=torch.float64)
    model.layers[1].mixer.expert_bias[4] = -1e4
    s = activation_scores(model, MOE, BATCHES)
    assert s.layers[1].units[4] == 0 and min(s.layers[1].units[:4]) > 0
    assert min(s.layers[3].units) > 0


@torch.no_grad()
def test_magnitude_scores_follow_the_weights():
    model = build_model(DENSE, dtype=torch.float64)
    model.layers[0].mixer.q_proj.weight[16:24] *= 10  # head 2
    model.embed.weight[:, 3] *= 10
    s = magnitude_scores(model, DENSE)
    assert max(range(4), key=lambda h: s.layers[0].units[h]) == 2
    assert max(range(32), key=lambda c: s.hidden[c]) == 3
