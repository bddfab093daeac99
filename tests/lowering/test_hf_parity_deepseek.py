"""Reference DeepSeek-V3 model == transformers' DeepseekV3ForCausalLM (fp32 logits within 1e-5):
multi-head latent attention with and without a q LoRA rank, interleaved and rotate-half rotary
dims, YaRN with DeepSeek's mscale pair (cos/sin factor and softmax-scale adjustment), first-k dense
layers, and the sigmoid router with expert bias, group-limited top-k (a group scores its best 2,
which differs from Megatron's top_k // topk_group here), norm_topk_prob and the routed scaling
factor, plus the shared expert. transformers' model has no multi-token-prediction layer, nor does
plait's import."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_parity_util import hf_and_reference, max_logit_diff  # noqa: E402

from plait.kinds.attention.latent_module import LatentAttention  # noqa: E402

torch.set_num_threads(1)

TINY = dict(model_type="deepseek_v3", vocab_size=96, hidden_size=32, intermediate_size=48,
            moe_intermediate_size=12, num_hidden_layers=3, first_k_dense_replace=1,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24,
            qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=8, num_experts_per_tok=2,
            n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
            max_position_embeddings=256, rms_norm_eps=1e-6)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 32,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.7, "mscale_all_dim": 1.3}

CASES = {
    "v3-yarn-interleaved": dict(rope_parameters=YARN, rope_interleave=True),
    "no-q-lora-rotate-half": dict(q_lora_rank=None, rope_interleave=False,
                                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "ungrouped-no-renorm": dict(n_group=1, topk_group=1, norm_topk_prob=False, n_shared_experts=2,
                                first_k_dense_replace=0, rope_parameters=YARN),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_deepseek_v3_logits_match_transformers(case):
    cfg = TINY | CASES[case]
    hf, ref = hf_and_reference(cfg)
    assert sum(isinstance(m, LatentAttention) for m in ref.modules()) == cfg["num_hidden_layers"]
    # seq 48 > original_max_position_embeddings (32): positions where YaRN's interpolation matters
    assert max_logit_diff(hf, ref, cfg["vocab_size"], seq=48) <= 1e-5
