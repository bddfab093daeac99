"""HF import: fields land on the right IR values; anything plait cannot represent is an error
that names the field and its value."""
import json
from pathlib import Path

import pytest

from plait.ir.errors import PlaitError
from plait.ir.hf import model_from_hf_config, model_from_hf_file
from plait.ir.model import RopeScaling

SPECS = Path(__file__).resolve().parents[2] / "specs" / "hf"


def public(name: str) -> dict:
    return json.loads((SPECS / f"{name}.json").read_text())


def test_llama_fields():
    m = model_from_hf_file(str(SPECS / "llama-3.1-8b.json"), name="l8")
    assert (m.name, m.vocab, m.hidden, m.num_layers, m.max_seq) == ("l8", 128256, 4096, 64, 131072)
    assert m.layers[:2] == ("attention", "mlp") and not m.tie_embeddings
    a = m.attention
    assert (a.heads, a.kv_heads, a.head_dim, a.qkv_bias, a.qk_norm) == (32, 8, 128, False, False)
    assert a.rope.theta == 500000.0
    assert a.rope.scaling == RopeScaling("llama3", 8.0, original_max_positions=8192,
                                         low_freq_factor=1.0, high_freq_factor=4.0)
    assert (m.mlp.ffn, m.mlp.activation, m.norm.eps) == (14336, "swiglu", 1e-5)


def test_default_name_comes_from_the_checkpoint_path():
    assert model_from_hf_config(public("mixtral-8x22b")).name == "mixtral-8x22b-v0.1"


def test_mixtral_router_follows_transformers():
    moe = model_from_hf_config(public("mixtral-8x7b")).moe
    assert (moe.experts, moe.top_k, moe.ffn, moe.router) == (8, 2, 14336, "softmax")
    assert moe.pre_softmax and moe.norm_topk and moe.aux_loss == 0.02 and moe.shared_ffn == 0


def test_qwen2_moe_shared_expert_gate_and_biases():
    m = model_from_hf_config(public("qwen2-57b-a14b"))
    assert m.attention.qkv_bias and not m.attention.out_bias
    assert (m.moe.shared_ffn, m.moe.shared_gate, m.moe.norm_topk) == (20480, True, False)
    assert m.mlp is None and m.layers == ("attention", "moe") * 28


def test_qwen_moe_sparse_step_and_mlp_only_layers_become_a_layer_sequence():
    cfg = public("qwen2-57b-a14b") | {"num_hidden_layers": 6, "decoder_sparse_step": 2,
                                      "mlp_only_layers": [3]}
    m = model_from_hf_config(cfg)
    # MoE where (i + 1) % 2 == 0 and i not in [3]: layers 1 and 5
    assert m.layers == ("attention", "mlp", "attention", "moe", "attention", "mlp",
                        "attention", "mlp", "attention", "mlp", "attention", "moe")
    assert m.mlp.ffn == 18944


def test_qwen3_moe_qk_norm():
    m = model_from_hf_config(public("qwen3-30b-a3b"))
    assert m.attention.qk_norm and m.moe.norm_topk and m.moe.experts == 128


def test_nemotron_h_pattern_and_blocks():
    cfg = public("nemotron-h-8b")
    m = model_from_hf_config(cfg)
    assert m.pattern == cfg["hybrid_override_pattern"]
    assert m.attention.rope is None and m.mlp.activation == "relu2"
    mb = m.mamba
    assert (mb.heads, mb.head_dim, mb.groups, mb.state, mb.conv, mb.chunk) == (128, 64, 8, 128, 4, 128)
    assert mb.conv_bias and not mb.proj_bias
    assert mb.dt_min == 0.0  # time_step_limit [0, Infinity]: no floor (time_step_min only inits)


def test_nemotron_h_dt_floor_is_time_step_limit_s_low_end():
    """transformers >= 5.25 clamps dt at time_step_limit (writing infinity as {"__float__": ...});
    plait's mixer has no ceiling, so a finite high end is an error naming the key."""
    cfg = public("nemotron-h-8b")
    inf = {"__float__": "Infinity"}
    assert model_from_hf_config(cfg | {"time_step_limit": [0.01, inf]}).mamba.dt_min == 0.01
    for bad in ([0.0, 1.0], 0.01):
        with pytest.raises(PlaitError, match="time_step_limit"):
            model_from_hf_config(cfg | {"time_step_limit": bad})


def test_nemotron_h_moe_layers_and_layers_block_type():
    cfg = public("nemotron-h-8b") | {
        "hybrid_override_pattern": None, "num_hidden_layers": None,
        "layers_block_type": ["mamba", "moe", "attention", "moe"], "n_routed_experts": 16,
        "num_experts_per_tok": 4, "moe_intermediate_size": 256, "n_shared_experts": 1,
        "moe_shared_expert_intermediate_size": 512, "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True}
    m = model_from_hf_config(cfg)
    assert m.pattern == "ME*E" and m.mlp is None
    moe = m.moe
    assert (moe.router, moe.expert_bias, moe.activation, moe.shared_ffn) == ("sigmoid", True, "relu2", 512)
    assert (moe.groups, moe.topk_groups, moe.scaling_factor, moe.top_k) == (4, 2, 2.5, 4)


@pytest.mark.parametrize("name,change,field", [
    ("llama-3.1-8b", {"model_type": "gemma"}, "model_type = 'gemma'"),
    ("llama-3.1-8b", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type = 'dynamic'"),
    ("llama-3.1-8b", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "mscale": 0.7}},
     "rope_parameters.mscale"),
    ("llama-3.1-8b", {"partial_rotary_factor": 0.5}, "partial_rotary_factor = 0.5"),
    ("llama-3.1-8b", {"sliding_window": 4096}, "sliding_window = 4096"),  # Llama has no window
    ("qwen3-30b-a3b", {"layer_types": ["sliding_attention"] * 48}, "layer_types"),  # none to slide
    ("llama-3.1-8b", {"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
    ("llama-3.1-8b", {"attention_dropout": 0.1}, "attention_dropout = 0.1"),
    ("llama-3.1-8b", {"qk_layernorm": True}, "qk_layernorm = True"),
    ("llama-3.1-8b", {"num_key_value_heads": 5}, "num_key_value_heads = 5"),
    ("mixtral-8x7b", {"router_jitter_noise": 0.01}, "router_jitter_noise = 0.01"),
    ("mixtral-8x7b", {"num_experts_per_tok": 9}, "num_experts_per_tok = 9"),
    ("nemotron-h-8b", {"hybrid_override_pattern": "M-G*"}, "hybrid_override_pattern = 'M-G*'"),
    ("nemotron-h-8b", {"num_hidden_layers": 50}, "num_hidden_layers = 50"),
    ("nemotron-h-8b", {"num_nextn_predict_layers": 1}, "num_nextn_predict_layers = 1"),
    ("nemotron-h-8b", {"mlp_hidden_act": "silu"}, "mlp_hidden_act = 'silu'"),
    ("nemotron-h-8b", {"tie_word_embeddings": True}, "tie_word_embeddings = True"),
    ("nemotron-h-8b", {"n_groups": 7}, "n_groups = 7"),
    ("nemotron-h-8b", {"hybrid_override_pattern": "ME", "num_hidden_layers": 2,
                       "moe_latent_size": 64}, "moe_latent_size = 64"),
    ("nemotron-h-8b", {"head_dim": 64}, "attention_head_dim = 128"),
])
def test_unrepresentable_fields_are_named(name, change, field):
    with pytest.raises(PlaitError) as e:
        model_from_hf_config(public(name) | change)
    assert field in e.value.message


def test_missing_required_field_is_named():
    cfg = public("llama-3.1-8b")
    del cfg["hidden_size"]
    with pytest.raises(PlaitError, match="hidden_size"):
        model_from_hf_config(cfg)


def test_not_a_json_object():
    with pytest.raises(PlaitError, match="JSON object"):
        model_from_hf_config(["llama"])
