"""`plait export hf` of DeepSeek-V3-shaped models (multi-head latent attention, first-k dense layers,
sigmoid-routed MoE with the expert bias, group-limited top-k, shared expert, routed scaling):

- round trip: a random transformers DeepseekV3ForCausalLM -> `plait import hf` + --weights -> a
  plait checkpoint -> export -> transformers' from_pretrained gives the very tensors and the
  original model's logits (fp32, within 1e-5);
- a tiny MLA-MoE model written as a plait spec, trained a few steps from plait's own
  initialisation: the export loads in transformers with no missing or unexpected keys and its
  logits equal plait's reference model on the checkpoint's tensors, `plait import hf` of the
  exported config gives back the spec, and a bf16 export keeps the router and its expert bias in
  fp32 as transformers' own save does.
The tier-2 test in test_ckpt_export.py exports the same family from a TP2 x EP2 checkpoint."""
import pytest
import torch

pytest.importorskip("transformers")

from plait.cli import main  # noqa: E402
from plait.ir.dsl import parse_text  # noqa: E402
from plait.ir.hf import model_from_hf_file  # noqa: E402
from plait.ir.plan import Layout  # noqa: E402
from plait.lowering.build import build_model  # noqa: E402
from plait.runtime.ckpt_export import checkpoint_tensors, export_hf  # noqa: E402
from plait.runtime.ckpt_integrity import find  # noqa: E402
from plait.runtime.ckpt_store import Reader  # noqa: E402

from ckpt_util import single_rank  # noqa: E402
from export_util import (FAMILIES, check_export, logit_diff, save_from_hub, save_hub_model,  # noqa: E402
                         tensors, train_and_save)

SHARD_BYTES = 16 << 10  # several shards even for a tiny model
TOL = 1e-5
# As a user would write it: no q LoRA rank (q_proj), rotate-half rotary dims, plain RoPE, two
# dense decoder layers first, two shared experts, no groups, plait's balancing loss.
MLA_MOE = parse_text('''model "tiny-mla-moe" {
  vocab = 96
  hidden = 32
  norm = rmsnorm(eps = 1e-6)
  max_seq = 64
  attention {
    heads = 4
    latent = mla(kv_lora_rank = 16, qk_nope_head_dim = 8, qk_rope_head_dim = 4, v_head_dim = 6,
                 rope_interleave = false)
    rope = rope(theta = 10000)
  }
  mlp { ffn = 48 }
  moe { experts = 4, top_k = 2, ffn = 16, shared_ffn = 32, router = sigmoid, expert_bias = true,
        norm_topk = false, scaling_factor = 1.5, aux_loss = 0.01 }
  layers = 2 * [attention, mlp] + 2 * [attention, moe]
}
''').models["tiny-mla-moe"]


def test_a_transformers_deepseek_v3_round_trips_through_a_plait_checkpoint(tmp_path, capsys):
    original = save_hub_model(FAMILIES["deepseek_v3"], tmp_path / "hub")
    with single_rank(tmp_path):
        save_from_hub(tmp_path / "hub", Layout(), tmp_path / "ckpt")
    assert main(["export", "hf", str(tmp_path / "ckpt"), "-o", str(tmp_path / "hf"), "--dtype", "fp32",
                 "--max-shard-mb", "1"]) == 0
    assert "deepseek_v3 model after step 0" in capsys.readouterr().out
    export_hf(tmp_path / "ckpt", tmp_path / "sharded", "fp32", max_shard_bytes=SHARD_BYTES)
    assert check_export(tmp_path / "sharded", tmp_path / "hub", "deepseek_v3") <= TOL
    assert _transformers_diff(original, tmp_path / "sharded") <= TOL


def _transformers_diff(original, exported) -> float:
    """The largest logit difference between ``original`` and transformers' load of ``exported``."""
    import transformers

    back = transformers.AutoModelForCausalLM.from_pretrained(
        str(exported), experts_implementation="eager", dtype=torch.float32).eval()
    tokens = torch.randint(0, original.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (back(tokens, use_cache=False).logits - original(tokens, use_cache=False).logits).abs().max().item()


def test_a_trained_mla_moe_checkpoint_exports_to_transformers(tmp_path):
    with single_rank(tmp_path):
        ckpt = train_and_save(MLA_MOE, Layout(), tmp_path / "ckpt", step=3)
    state = dict(checkpoint_tensors(Reader(find(ckpt))))
    assert any(name.endswith("expert_bias") and t.abs().max() > 0 for name, t in state.items())  # trained
    assert export_hf(ckpt, tmp_path / "hf", "fp32", max_shard_bytes=SHARD_BYTES)["family"] == "deepseek_v3"
    assert model_from_hf_file(str(tmp_path / "hf"), MLA_MOE.name) == MLA_MOE  # `plait import hf`
    plait_model = build_model(MLA_MOE, seed=7)
    plait_model.load_state_dict(state)
    assert logit_diff(tmp_path / "hf", plait_model) <= TOL

    export_hf(ckpt, tmp_path / "bf16")  # as transformers saves a bf16 DeepSeek-V3: the routers fp32
    exported = tensors(tmp_path / "bf16")
    router = {k for k in exported if k.endswith(("mlp.gate.weight", "e_score_correction_bias"))}
    assert len(router) == 4 and {exported[k].dtype for k in router} == {torch.float32}
    assert {t.dtype for k, t in exported.items() if k not in router} == {torch.bfloat16}
    assert torch.equal(exported["model.layers.3.mlp.gate.e_score_correction_bias"],
                       state["layers.7.mixer.expert_bias"])  # the trained bias, not rounded
