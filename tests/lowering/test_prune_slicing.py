"""Weight slicing by a PrunePlan: sliced models equal the source model with the pruned structures
switched off (ffn neurons, attention heads, layers, experts), Mamba's sliced pieces feed exactly
the kept heads and channels, counts equal the plan's, and the published 8B -> 4B shapes slice on
the meta device."""
from dataclasses import replace

import pytest
import torch

from plait.ir import counts
from plait.ir.dsl import load_prune_job
from plait.ir.errors import PlaitError
from plait.ir.job import AxisSearch, PruneJob, PruneTarget
from plait.kinds.mamba.layout import mamba_inner
from plait.lowering.build import build_model
from plait.lowering.prune.checkpoint import read_weights, save_weights
from plait.lowering.prune.slicing import check_pruned, slice_state_dict
from plait.planner.prune.plan import plan_prune
from plait.planner.prune.scores import random_scores
from prune_util import DENSE, HYBRID, MOE

torch.set_num_threads(1)
TOKENS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


def make_plan(spec, axes, depth=(), params=10 ** 9, seed=0):
    job = PruneJob(name="pruned", model=spec, target=PruneTarget(params=params), depth=depth,
                   axes=tuple(AxisSearch(a, "fixed", value=v) for a, v in axes.items()))
    return plan_prune(job, random_scores(spec, seed), top=1).plan


def pruned_pair(spec, plan):
    source = build_model(spec, dtype=torch.float64, seed=1)
    state = slice_state_dict(source.state_dict(), spec, plan)
    assert check_pruned(state, plan) == plan.chosen.params == counts.params(plan.model).total
    student = build_model(plan.model, dtype=torch.float64)
    student.load_state_dict(state, strict=True)
    return source, student


@pytest.mark.parametrize("spec", [DENSE, HYBRID, MOE], ids=lambda s: s.name)
def test_keeping_everything_is_the_identity(spec):
    plan = make_plan(spec, {})
    source, student = pruned_pair(spec, plan)
    assert torch.equal(source(TOKENS), student(TOKENS))


@torch.no_grad()
def test_ffn_heads_and_depth_equal_switching_them_off():
    full = counts.params(replace(DENSE, attention=replace(DENSE.attention, heads=2), mlp=replace(DENSE.mlp, ffn=32)))
    one_mlp = counts.layer_params(replace(DENSE, mlp=replace(DENSE.mlp, ffn=32)), "mlp")
    plan = make_plan(DENSE, {"ffn": 32, "attention_heads": 2}, depth=("mlp",), params=full.total - one_mlp)
    assert plan.model.layers.count("mlp") == 1
    source, student = pruned_pair(DENSE, plan)
    kept = {k.layer: k for k in plan.layers}
    for i, layer in enumerate(source.layers):
        mixer = layer.mixer
        out = mixer.o_proj if layer.kind == "attention" else mixer.down_proj
        if i not in kept:
            out.weight.zero_()  # a dropped layer becomes the identity
            continue
        if layer.kind == "attention":
            drop = [h for h in range(4) if h not in kept[i].units]
            for h in drop:
                out.weight[:, h * 8:(h + 1) * 8] = 0
            assert len(kept[i].units) == 2 and {u // 2 for u in kept[i].units} == {0, 1}  # one per KV group
        else:
            out.weight[:, [n for n in range(48) if n not in kept[i].units]] = 0
    torch.testing.assert_close(student(TOKENS), source(TOKENS), rtol=0, atol=1e-12)


@torch.no_grad()
def test_dropped_experts_never_chosen_change_nothing():
    plan = make_plan(MOE, {"experts": 4})
    source, student = pruned_pair(MOE, plan)
    for k in plan.layers:
        if k.kind == "moe":
            gone = [e for e in range(6) if e not in k.units]
            source.layers[k.layer].mixer.expert_bias[gone] = -1e4  # the router never picks them
            assert student.layers[plan.layers.index(k)].mixer.router.weight.shape == (4, 32)
    torch.testing.assert_close(student(TOKENS), source(TOKENS), rtol=0, atol=1e-12)


def _norm_input(mixer, x):
    """The (y, z) a mamba mixer hands its gated norm for input ``x``."""
    seen = []
    handle = mixer.norm.register_forward_pre_hook(lambda m, args: seen.append(args))
    try:
        mixer(x)
    finally:
        handle.remove()
    return seen[0]


@torch.no_grad()
def test_mamba_slices_feed_exactly_the_kept_heads_and_channels():
    plan = make_plan(HYBRID, {"mamba_heads": 2, "mamba_head_dim": 4})
    source, student = pruned_pair(HYBRID, plan)
    x = torch.randn(2, 16, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    keeps = [(j, k) for j, k in enumerate(plan.layers) if k.kind == "mamba"]
    assert len(keeps) == 2
    for j, keep in keeps:
        y, z = _norm_input(student.layers[j].mixer, x)
        y0, z0 = _norm_input(source.layers[keep.layer].mixer, x)
        inner = mamba_inner(keep, 8)
        assert len(keep.units) == 2 and {u // 2 for u in keep.units} == {0, 1}  # one head per group
        torch.testing.assert_close(y, y0[..., inner], rtol=0, atol=1e-12)
        torch.testing.assert_close(z, z0[..., inner], rtol=0, atol=1e-12)
    mixer = student.layers[0].mixer
    assert mixer.norm.group_size == 4 and mixer.conv1d.weight.shape[0] == 8 + 2 * 2 * 4


def test_hidden_channels_slice_through_every_norm():
    plan = make_plan(MOE, {"hidden": 24})
    source, student = pruned_pair(MOE, plan)
    hk = list(plan.hidden)
    assert torch.equal(student.embed.weight, source.embed.weight[:, hk])
    assert torch.equal(student.layers[1].mixer.experts.w_down, source.layers[1].mixer.experts.w_down[:, hk, :])
    assert torch.equal(student.layers[1].mixer.shared_gate.weight, source.layers[1].mixer.shared_gate.weight[:, hk])
    assert torch.isfinite(student(TOKENS)).all()


def test_published_4b_shapes_slice_on_the_meta_device():
    job = load_prune_job("specs/jobs/nemotron-h-8b-prune-4.5b.plait")
    job = replace(job, train=None, layout=type(job.layout)(), target=PruneTarget(), depth=(),
                  axes=tuple(AxisSearch(a, "fixed", value=v) for a, v in
                             (("hidden", 3072), ("ffn", 12288), ("mamba_heads", 112))))
    plan = plan_prune(job, top=1).plan
    with torch.device("meta"):
        source = build_model(job.model, device="meta")
    state = slice_state_dict(source.state_dict(), job.model, plan)
    assert check_pruned(state, plan) == 4_489_223_040
    assert state["layers.0.mixer.in_proj.weight"].shape == (2 * 7168 + 2 * 8 * 128 + 112, 3072)


def test_mismatched_weights_name_the_numbers(tmp_path):
    save_weights(build_model(DENSE).state_dict(), tmp_path / "w.safetensors")
    other = replace(DENSE, mlp=replace(DENSE.mlp, ffn=40))
    with pytest.raises(PlaitError) as info:
        read_weights(other, tmp_path / "w.safetensors")
    assert "do not match model 'micro-dense'" in info.value.message
    assert "layers.1.mixer.up_proj.weight: the weights in" in info.value.message
    assert "have (48, 32), model 'micro-dense' needs (40, 32)" in info.value.message
    with pytest.raises(PlaitError, match="weight file not found"):
        read_weights(DENSE, tmp_path / "none.safetensors")
    assert set(read_weights(DENSE, tmp_path / "w.safetensors")) == set(build_model(DENSE).state_dict())
