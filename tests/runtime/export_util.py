"""Shared by the export tests: tiny random transformers models per family, saved as a hub
checkpoint, and the checks an export must pass against them."""
import json
from pathlib import Path

import torch

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-6)
HYBRID = dict(model_type="nemotron_h", vocab_size=96, hidden_size=32, intermediate_size=48,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, mamba_num_heads=8,
              mamba_head_dim=8, n_groups=2, ssm_state_size=8, chunk_size=16,
              n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
              moe_shared_expert_intermediate_size=16, max_position_embeddings=64,
              hybrid_override_pattern="ME*-")
FAMILIES = {
    "llama": TINY | dict(model_type="llama", attention_bias=True, tie_word_embeddings=True),
    "mistral": TINY | dict(model_type="mistral", sliding_window=5),  # windows shorter than the
    "qwen2": TINY | dict(model_type="qwen2", use_sliding_window=True, sliding_window=6,  # 16 tokens
                         max_window_layers=1),  # logit_diff reads: layer 0 full, layer 1 windowed
    "qwen3": TINY | dict(model_type="qwen3", head_dim=16),
    "mixtral": TINY | dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": TINY | dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=16, shared_expert_intermediate_size=40),
    "qwen3_moe": TINY | dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=16, norm_topk_prob=True, head_dim=16),
    "nemotron_h": HYBRID,
}


def save_hub_model(cfg: dict, where: Path):
    """A tiny random transformers model of ``cfg`` saved with save_pretrained (fp32); returns it."""
    import transformers

    torch.manual_seed(0)
    hf_cfg = transformers.AutoConfig.for_model(**cfg)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, experts_implementation="eager")
    with torch.no_grad():  # every tensor random (HF sets norms to one, some weights to zero)
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.1)
    model.save_pretrained(str(where))
    return model.eval()


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def check_export(exported: Path, hub: Path, family: str) -> float:
    """The export is sharded, holds exactly the hub checkpoint's tensors, and loads in
    transformers (see `logit_diff`); returns the largest logit difference."""
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2  # sharded
    want, got = tensors(hub), tensors(exported)
    assert set(got) == set(want), (family, set(got) ^ set(want))
    assert all(torch.equal(got[k], want[k]) for k in want), family
    return logit_diff(exported)


def logit_diff(exported: Path, student=None) -> float:
    """transformers loads the export with no missing or unexpected keys; the largest difference
    between its logits and plait's reference model's (``student``, else one read from the
    export)."""
    import transformers

    from plait.ir.hf import model_from_hf_file
    from plait.lowering.build import build_model
    from plait.lowering.weights import load_hf_weights

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(exported), output_loading_info=True, experts_implementation="eager", dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    if student is None:
        spec = model_from_hf_file(str(exported))
        student = build_model(spec, seed=1)
        load_hf_weights(student, str(exported), spec)
    tokens = torch.randint(0, model.config.vocab_size, (2, 16),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (model.eval()(tokens, use_cache=False).logits - student.eval()(tokens)).abs().max().item()
