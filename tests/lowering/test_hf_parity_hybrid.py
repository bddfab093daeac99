"""Reference hybrid model == transformers' NemotronHForCausalLM (fp32 logits within 1e-5) for tiny
random configs with Mamba2 (M), attention (*), squared-ReLU MLP (-) and sigmoid-routed MoE (E) layers."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "NemotronHForCausalLM"):
    pytest.skip("this transformers has no nemotron_h", allow_module_level=True)

from hf_parity_util import hf_and_reference, max_logit_diff  # noqa: E402

torch.set_num_threads(1)

TINY = dict(model_type="nemotron_h", vocab_size=96, hidden_size=32, intermediate_size=48,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, mamba_num_heads=8, mamba_head_dim=4,
            n_groups=2, ssm_state_size=8, chunk_size=8, layer_norm_epsilon=1e-5,
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
            moe_shared_expert_intermediate_size=24)

CASES = {
    "M*-M": dict(hybrid_override_pattern="M*-M"),
    "ME*-": dict(hybrid_override_pattern="ME*-ME", routed_scaling_factor=2.5),
    "grouped-router": dict(hybrid_override_pattern="ME", n_group=4, topk_group=1, norm_topk_prob=False),
    "one-group-per-head": dict(hybrid_override_pattern="MM", n_groups=8, mamba_head_dim=8, chunk_size=16,
                               use_conv_bias=False),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seq", [29, 32])  # not a multiple of the chunk, and several chunks
def test_hybrid_logits_match_transformers(case, seq):
    cfg = TINY | CASES[case]
    # std 0.2: with 0.3 the fp32 rounding of either implementation alone (measured against a
    # float64 run) reaches 4e-5 on "one-group-per-head", so 1e-5 would test noise, not agreement
    hf, ref = hf_and_reference(cfg, std=0.2)
    assert max_logit_diff(hf, ref, cfg["vocab_size"], seq=seq) <= 1e-5


def test_dt_floor_of_time_step_limit_matches_transformers():
    """transformers clamps dt = softplus(dt + dt_bias) from below at time_step_limit's low end. With
    its own dt_bias initialisation (dt in [time_step_min, time_step_max]) many heads sit near a
    floor at time_step_min, so the clamp changes the logits; plait must apply the same floor."""
    import dataclasses

    from plait.lowering.build import build_model

    cfg = TINY | CASES["M*-M"] | dict(time_step_min=0.01, time_step_max=0.1,
                                      time_step_limit=(0.01, float("inf")))
    hf, ref = hf_and_reference(cfg, std=0.2, keep=("dt_bias",))
    assert ref.spec.mamba.dt_min == 0.01
    assert max_logit_diff(hf, ref, cfg["vocab_size"]) <= 1e-5
    # the floor matters here: the same weights without it are far off
    spec = dataclasses.replace(ref.spec, mamba=dataclasses.replace(ref.spec.mamba, dt_min=0.0))
    unfloored = build_model(spec, seed=1).eval()
    unfloored.load_state_dict(ref.state_dict())
    assert max_logit_diff(hf, unfloored, cfg["vocab_size"]) > 1e-3


def test_hub_checkpoint_layout_loads_from_safetensors(tmp_path):
    """Nemotron-H hub files say ``backbone.`` and store each expert separately; the loader reads
    them (sharded over two files) into the same model as the transformers state dict."""
    from safetensors.torch import save_file

    from plait.lowering.build import build_model
    from plait.lowering.weights import load_hf_weights

    hf, ref = hf_and_reference(TINY | CASES["ME*-"], std=0.2)
    hub = {}
    for name, t in hf.state_dict().items():
        name = name.replace("model.", "backbone.", 1)
        if name.endswith(("experts.up_proj", "experts.down_proj")):
            for e in range(t.shape[0]):
                hub[name.replace("experts.", f"experts.{e}.") + ".weight"] = t[e].contiguous()
        else:
            hub[name] = t.contiguous()
    names = sorted(hub)
    save_file({k: hub[k] for k in names[::2]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: hub[k] for k in names[1::2]}, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "config.json").write_text('{"model_type": "nemotron_h"}')
    fresh = build_model(ref.spec, seed=5)
    load_hf_weights(fresh, tmp_path, ref.spec)
    for k, v in ref.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
