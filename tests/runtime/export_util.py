"""Shared by the export tests: tiny random transformers models per family, saved as a hub
checkpoint, trainers that save plait checkpoints (from a hub model or their own initialisation),
and the checks an export must pass against them."""
import json
from pathlib import Path

import torch

from plait.ir.hf import model_from_hf_file
from plait.runtime import checkpoint
from plait.runtime.harness.parity import TIMEOUT_S, Case, Setup
from plait.runtime.mesh import build_mesh
from plait.runtime.train import Trainer

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-6)
HYBRID = dict(model_type="nemotron_h", vocab_size=96, hidden_size=32, intermediate_size=48,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, mamba_num_heads=8,
              mamba_head_dim=8, n_groups=2, ssm_state_size=8, chunk_size=16,
              n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
              moe_shared_expert_intermediate_size=16, max_position_embeddings=64,
              hybrid_override_pattern="ME*-")
# DeepSeek-V3: latent attention with a q LoRA rank, interleaved rotary dims and YaRN's mscale pair
# (the 16 tokens logit_diff reads pass original_max_position_embeddings), one dense decoder layer,
# then 4 sigmoid-routed experts in 2 groups (best 1) with the expert bias and one shared expert.
DEEPSEEK = dict(model_type="deepseek_v3", vocab_size=96, hidden_size=32, intermediate_size=48,
                moe_intermediate_size=16, num_hidden_layers=2, first_k_dense_replace=1,
                num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=4,
                num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=32,
                rms_norm_eps=1e-6, rope_interleave=True,
                rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                 "original_max_position_embeddings": 8, "beta_fast": 32.0,
                                 "beta_slow": 1.0, "mscale": 0.7, "mscale_all_dim": 1.0})
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
    "deepseek_v3": DEEPSEEK,
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


def save_from_hub(hub: Path, layout, out: Path, step: int = 0) -> Path:
    """Collective: a trainer under ``layout`` starts from the hub weights (--weights) and saves a
    checkpoint after ``step`` steps."""
    return train_and_save(model_from_hf_file(str(hub)), layout, out, step, weights=str(hub))


def train_and_save(spec, layout, out: Path, step: int, weights: str | None = None) -> Path:
    """Collective: a trainer of ``spec`` under ``layout`` (from ``weights``, else its seeded
    initialisation) takes ``step`` steps on synthetic tokens and saves a checkpoint."""
    setup = Setup(spec, global_batch=4, seq=16, steps=max(step, 2))
    plan = Case("export", layout).plan(spec, setup.global_batch, setup.seq)
    trainer = Trainer(setup.job(plan.world), plan, build_mesh(plan.layout, TIMEOUT_S),
                      source=setup.source(), weights=weights)
    for s in range(step):
        trainer.train_step(s, setup.steps)
    return checkpoint.save(trainer, out, step, setup.steps)


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
