"""HF import: plait's parameter count equals transformers' own model, built on the meta device,
for small random configs of every supported model type and for the full-size library configs."""
import json
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from plait.ir import counts  # noqa: E402
from plait.ir.hf import SUPPORTED_TYPES, model_from_hf_config  # noqa: E402

SPECS = Path(__file__).resolve().parents[2] / "specs" / "hf"


def hf_param_count(config) -> int:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def common(r: random.Random) -> dict:
    heads = r.choice([2, 4])
    return dict(vocab_size=r.choice([61, 64, 97]), hidden_size=r.choice([16, 24, 32]),
                num_attention_heads=heads,
                num_key_value_heads=r.choice([k for k in (1, 2, 4) if heads % k == 0]),
                head_dim=r.choice([4, 8]), intermediate_size=r.choice([12, 20, 36]),
                num_hidden_layers=r.randint(1, 4), tie_word_embeddings=r.random() < 0.3)


def rope(r: random.Random) -> dict:
    return r.choice([
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0},
        {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
         "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0},
    ])


def qwen_moe_layout(r: random.Random, layers: int) -> dict:
    return dict(decoder_sparse_step=r.choice([1, 2]),
                mlp_only_layers=sorted(r.sample(range(layers), r.randint(0, layers // 2))),
                moe_intermediate_size=r.choice([8, 12]), num_experts=r.choice([3, 4, 8]),
                num_experts_per_tok=r.choice([1, 2]), norm_topk_prob=r.random() < 0.5)


def random_config(model_type: str, seed: int):
    r = random.Random(f"{model_type}-{seed}")
    kw = common(r)
    kw["max_position_embeddings"] = 256
    if model_type == "nemotron_h":
        return transformers.NemotronHConfig(**nemotron_fields(r, kw))
    kw["rope_parameters"] = rope(r)
    if model_type in ("llama", "qwen3", "qwen3_moe"):
        kw["attention_bias"] = r.random() < 0.5
    if model_type == "llama":
        kw["mlp_bias"] = r.random() < 0.5
    if model_type == "mistral":
        kw["sliding_window"] = None
    if model_type == "mixtral":
        kw.update(num_local_experts=r.choice([2, 4, 8]), num_experts_per_tok=2)
    if model_type in ("qwen2_moe", "qwen3_moe"):
        kw.update(qwen_moe_layout(r, kw["num_hidden_layers"]))
    if model_type == "qwen2_moe":
        kw.update(shared_expert_intermediate_size=r.choice([16, 40]), qkv_bias=r.random() < 0.7)
    if model_type == "deepseek_v3":
        kw.update(deepseek_fields(r, kw))
    return transformers.AutoConfig.for_model(model_type, **kw)


def deepseek_fields(r: random.Random, kw: dict) -> dict:
    """Multi-head latent attention with or without a q LoRA rank, first-k dense layers, routed and
    shared experts (transformers derives head_dim from qk_rope_head_dim)."""
    kw.pop("head_dim")
    kw["num_key_value_heads"] = kw["num_attention_heads"]
    return dict(kv_lora_rank=r.choice([8, 12]), q_lora_rank=r.choice([None, 16]),
                qk_nope_head_dim=r.choice([4, 8]), qk_rope_head_dim=r.choice([2, 4]),
                v_head_dim=r.choice([4, 6]), first_k_dense_replace=r.randint(0, kw["num_hidden_layers"]),
                n_routed_experts=8, num_experts_per_tok=2, n_group=r.choice([1, 2, 4]), topk_group=1,
                moe_intermediate_size=r.choice([8, 12]), n_shared_experts=r.choice([1, 2]))


def nemotron_fields(r: random.Random, kw: dict) -> dict:
    pattern = "".join(r.choice("M*-E") for _ in range(r.randint(2, 7)))
    groups = r.choice([1, 2])
    kw.pop("num_hidden_layers")
    kw["tie_word_embeddings"] = False  # transformers' Nemotron-H never ties (plait rejects it)
    kw.update(hybrid_override_pattern=pattern, mamba_num_heads=groups * r.choice([2, 4]),
              mamba_head_dim=r.choice([4, 8]), n_groups=groups, ssm_state_size=r.choice([4, 16]),
              conv_kernel=r.choice([2, 4]), use_conv_bias=r.random() < 0.5,
              use_bias=r.random() < 0.5, n_routed_experts=4, num_experts_per_tok=2,
              moe_intermediate_size=r.choice([8, 12]), moe_shared_expert_intermediate_size=16,
              n_group=r.choice([1, 2]), topk_group=1, routed_scaling_factor=2.5,
              mlp_bias="E" not in pattern and r.random() < 0.5)
    return kw


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("model_type", SUPPORTED_TYPES)
def test_small_random_configs_match_transformers(model_type, seed):
    config = random_config(model_type, seed)
    spec = model_from_hf_config(config.to_dict(), name="random")
    assert counts.params(spec).total == hf_param_count(config)


def test_nemotron_h_random_patterns_cover_every_block_kind():
    kinds = set()
    for seed in range(3):
        cfg = random_config("nemotron_h", seed).to_dict()
        kinds |= set(model_from_hf_config(cfg).layers)
    assert kinds == {"mamba", "attention", "mlp", "moe"}


@pytest.mark.parametrize("path", sorted(SPECS.glob("*.json")), ids=lambda p: p.stem)
def test_full_size_library_configs_match_transformers(path):
    cfg = json.loads(path.read_text())
    kwargs = {k: v for k, v in cfg.items() if k not in ("model_type", "auto_map")}
    config = transformers.AutoConfig.for_model(cfg["model_type"], **kwargs)
    assert counts.params(model_from_hf_config(cfg)).total == hf_param_count(config)
