"""A config.json that omits a field gets the default of transformers' config class for its type."""
import pytest

transformers = pytest.importorskip("transformers")

from plait.ir.hf import TYPE_DEFAULTS, model_from_hf_config

CONFIG_CLASSES = {"mixtral": "MixtralConfig", "mistral": "MistralConfig", "deepseek_v3": "DeepseekV3Config"}
MINIMAL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)


def hf_default(model_type: str, key: str):
    cfg = getattr(transformers, CONFIG_CLASSES[model_type])().to_dict()
    if key == "rope_theta":
        return (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta"))
    return cfg[key]


@pytest.mark.parametrize("model_type,key", [(t, k) for t, d in TYPE_DEFAULTS.items() for k in d])
def test_type_defaults_equal_transformers(model_type, key):
    assert TYPE_DEFAULTS[model_type][key] == hf_default(model_type, key)


def test_mixtral_without_rope_theta_or_eps_takes_mixtral_defaults():
    spec = model_from_hf_config(dict(MINIMAL, model_type="mixtral", num_local_experts=4,
                                     num_experts_per_tok=2))
    assert spec.attention.rope.theta == 1e6
    assert spec.norm.eps == 1e-5


def test_mistral_without_sliding_window_slides_4096_tokens_like_transformers():
    assert model_from_hf_config(dict(MINIMAL, model_type="mistral")).attention.window == 4096
    spec = model_from_hf_config(dict(MINIMAL, model_type="mistral", sliding_window=None))
    assert spec.num_layers == 4 and spec.attention.window is None


def test_deepseek_v3_without_its_routing_fields_imports_as_transformers_builds_it():
    """q LoRA rank, first-k dense layers, shared experts, groups and routed scaling left out: the
    spec is the one of the config transformers fills in (its save_pretrained writes every field)."""
    minimal = dict(MINIMAL, model_type="deepseek_v3", num_hidden_layers=4, num_key_value_heads=4,
                   kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                   n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=8,
                   max_position_embeddings=64)
    filled = transformers.AutoConfig.for_model(**minimal).to_dict()
    spec = model_from_hf_config(minimal)
    assert spec == model_from_hf_config(filled, spec.name)
    assert (spec.moe.groups, spec.moe.scaling_factor, spec.attention.latent.q_lora_rank) == (8, 2.5, 1536)
