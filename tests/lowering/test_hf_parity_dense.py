"""Reference model == Hugging Face transformers (fp32 logits, max abs 1e-5) for tiny random
Llama / Mistral / Qwen2 / Qwen3 configs with the same weights, including RoPE scaling (linear, YaRN,
llama3) and sliding windows shorter than the 32-token test sequence (Mistral: every layer; Qwen2:
the layers from max_window_layers up; Qwen3 from layer_types)."""
from dataclasses import replace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_parity_util import hf_and_reference, max_logit_diff  # noqa: E402

from plait.ir.hf import model_from_hf_config  # noqa: E402
from plait.lowering.build import build_model  # noqa: E402

torch.set_num_threads(1)

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)

CASES = {
    "llama": dict(model_type="llama"),
    "llama-tied-bias": dict(model_type="llama", tie_word_embeddings=True, attention_bias=True),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=16),
    "llama-linear": dict(model_type="llama", rope_parameters=dict(rope_type="linear", factor=4.0,
                                                                  rope_theta=10000.0)),
    "llama-yarn": dict(model_type="llama", max_position_embeddings=128,
                       rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=10000.0,
                                            original_max_position_embeddings=32,
                                            beta_fast=32.0, beta_slow=1.0)),
    "llama-llama3": dict(model_type="llama", max_position_embeddings=128,
                         rope_parameters=dict(rope_type="llama3", factor=8.0, rope_theta=500000.0,
                                              original_max_position_embeddings=16, low_freq_factor=1.0,
                                              high_freq_factor=4.0)),
    "mistral-window": dict(model_type="mistral", sliding_window=5),
    "qwen2-window-top-layers": dict(model_type="qwen2", num_hidden_layers=3, use_sliding_window=True,
                                    sliding_window=7, max_window_layers=1),
    "qwen3-window-layer-types": dict(model_type="qwen3", head_dim=16, use_sliding_window=True,
                                     sliding_window=6, layer_types=["sliding_attention", "full_attention"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case):
    cfg = TINY | CASES[case]
    hf, ref = hf_and_reference(cfg)
    assert max_logit_diff(hf, ref, cfg["vocab_size"]) <= 1e-5


def test_rope_scaling_really_changes_the_model():
    """Guard against a vacuous YaRN test: with the scaling dropped the logits differ."""
    cfg = TINY | CASES["llama-yarn"]
    hf, ref = hf_and_reference(cfg)
    plain_cfg = transformers.AutoConfig.for_model(**TINY | {"model_type": "llama", "max_position_embeddings": 128})
    plain = build_model(model_from_hf_config(plain_cfg.to_dict()))
    plain.load_state_dict(ref.state_dict())
    assert max_logit_diff(hf, plain, cfg["vocab_size"]) > 1e-3


@pytest.mark.parametrize("case, change", [("mistral-window", 1), ("mistral-window", -1),
                                          ("qwen2-window-top-layers", None)])
def test_sliding_window_really_changes_the_model(case, change):
    """Guard against a vacuous window test: one token more or less of window (the mask convention
    i - j < window), or no window on the layers transformers slides, changes the logits."""
    cfg = TINY | CASES[case]
    hf, ref = hf_and_reference(cfg)
    a = ref.spec.attention
    other = replace(a, window=a.window + change) if change else replace(a, window=None, full_layers=())
    wrong = build_model(replace(ref.spec, attention=other))
    wrong.load_state_dict(ref.state_dict())
    assert max_logit_diff(hf, wrong, cfg["vocab_size"]) > 1e-3
