"""A config.json that omits a field gets the default of transformers' config class for its type."""
import pytest

transformers = pytest.importorskip("transformers")

from plait.ir.hf import TYPE_DEFAULTS, model_from_hf_config

CONFIG_CLASSES = {"mixtral": "MixtralConfig", "mistral": "MistralConfig"}
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
