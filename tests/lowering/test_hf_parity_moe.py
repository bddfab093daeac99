"""Reference MoE model == transformers (fp32 logits within 1e-5, dropless) for tiny random Mixtral,
Qwen2-MoE (shared expert with sigmoid gate, no top-k renormalisation) and Qwen3-MoE."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_parity_util import hf_and_reference, max_logit_diff  # noqa: E402

torch.set_num_threads(1)

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)

CASES = {
    "mixtral": dict(model_type="mixtral", num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(model_type="qwen2_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=40, norm_topk_prob=False),
    "qwen2_moe-sparse-step": dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2,
                                  moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                  decoder_sparse_step=2, norm_topk_prob=True),
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                      norm_topk_prob=True, head_dim=16),
    # widths that defeat torch._grouped_mm's 16-byte stride rule: the looped experts path
    "qwen3_moe-unaligned": dict(model_type="qwen3_moe", num_experts=6, num_experts_per_tok=3,
                                moe_intermediate_size=10, norm_topk_prob=True, head_dim=16),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_moe_logits_match_transformers(case):
    cfg = TINY | CASES[case]
    hf, ref = hf_and_reference(cfg)
    assert max_logit_diff(hf, ref, cfg["vocab_size"]) <= 1e-5


def test_transformers_fused_expert_layout_is_gate_rows_first():
    """The layout lowering/weights.py assumes: gate_up_proj (E, 2I, H) with the gate rows first,
    down_proj (E, H, I) — checked against the installed transformers' own expert forward."""
    cfg = transformers.AutoConfig.for_model(**TINY | CASES["mixtral"])
    hf = transformers.AutoModelForCausalLM.from_config(cfg)
    experts = hf.model.layers[0].mlp.experts
    e, two_i, h = experts.gate_up_proj.shape
    assert (two_i, tuple(experts.down_proj.shape)) == (2 * 48, (e, h, 48))
    x = torch.randn(3, h)
    with torch.no_grad():
        got = experts(x, torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
        gate, up = experts.gate_up_proj[0, :48], experts.gate_up_proj[0, 48:]
        want = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ experts.down_proj[0].T
    torch.testing.assert_close(got, want)
