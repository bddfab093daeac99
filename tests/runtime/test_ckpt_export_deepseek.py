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
- tier 2, as a user does it: `plait run` of a tiny MLA-MoE job (q LoRA rank, YaRN with the mscale
  pair, expert groups) under TP2 x SP x EP2 with --save, then `plait export hf`: transformers' logits
  equal plait's reference model on the checkpoint (the tier-2 test in test_ckpt_export.py exports the
  family from a TP2 x EP2 checkpoint of hub weights)."""
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from plait.cli import main  # noqa: E402
from plait.ir.dsl import parse_text  # noqa: E402
from plait.ir.dsl.fmt import format_model  # noqa: E402
from plait.ir.hf import model_from_hf_file  # noqa: E402
from plait.ir.model import Rope, RopeScaling  # noqa: E402
from plait.ir.plan import Layout  # noqa: E402
from plait.lowering.build import build_model  # noqa: E402
from plait.runtime.ckpt_export import checkpoint_tensors, export_hf  # noqa: E402
from plait.runtime.ckpt_integrity import find  # noqa: E402
from plait.runtime.ckpt_store import Reader  # noqa: E402

from ckpt_util import single_rank  # noqa: E402
from operate_util import env  # noqa: E402
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
    diffs = (check_export(tmp_path / "sharded", tmp_path / "hub", "deepseek_v3"),
             _transformers_diff(original, tmp_path / "sharded"))
    print(f"plait vs transformers {diffs[0]:.1e}, original vs exported {diffs[1]:.1e}")  # pytest -s
    assert max(diffs) <= TOL


def _transformers_diff(original, exported) -> float:
    """The largest logit difference between ``original`` and transformers' load of ``exported``."""
    back = transformers.AutoModelForCausalLM.from_pretrained(
        str(exported), experts_implementation="eager", dtype=torch.float32).eval()
    tokens = torch.randint(0, original.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (back(tokens, use_cache=False).logits - original(tokens, use_cache=False).logits).abs().max().item()


def test_a_trained_mla_moe_checkpoint_exports_to_transformers(tmp_path):
    with single_rank(tmp_path):
        ckpt = train_and_save(MLA_MOE, Layout(), tmp_path / "ckpt", step=3)
    assert export_hf(ckpt, tmp_path / "hf", "fp32", max_shard_bytes=SHARD_BYTES)["family"] == "deepseek_v3"
    assert model_from_hf_file(str(tmp_path / "hf"), MLA_MOE.name) == MLA_MOE  # `plait import hf`
    plait_model, state = _reference(MLA_MOE, ckpt)
    diff = logit_diff(tmp_path / "hf", plait_model)
    print(f"trained checkpoint: plait vs transformers {diff:.1e}")  # measured (pytest -s)
    assert diff <= TOL

    export_hf(ckpt, tmp_path / "bf16")  # as transformers saves a bf16 DeepSeek-V3: the routers fp32
    exported = tensors(tmp_path / "bf16")
    router = {k for k in exported if k.endswith(("mlp.gate.weight", "e_score_correction_bias"))}
    assert len(router) == 4 and {exported[k].dtype for k in router} == {torch.float32}
    assert {t.dtype for k, t in exported.items() if k not in router} == {torch.bfloat16}
    assert torch.equal(exported["model.layers.3.mlp.gate.e_score_correction_bias"],
                       state["layers.7.mixer.expert_bias"])  # the trained bias, not rounded


def _reference(spec, ckpt) -> tuple:
    """plait's reference model of ``spec`` holding a checkpoint's tensors, and those tensors (whose
    expert bias must have moved: a trained router)."""
    state = dict(checkpoint_tensors(Reader(find(ckpt))))
    assert any(name.endswith("expert_bias") and t.abs().max() > 0 for name, t in state.items())
    model = build_model(spec, seed=7)
    model.load_state_dict(state)
    return model, state


# DeepSeek-V3's own shape: q LoRA rank, interleaved rotary dims, YaRN with the mscale pair, groups.
_LATENT = replace(MLA_MOE.attention.latent, q_lora_rank=24, rope_interleave=True)
E2E = replace(MLA_MOE, name="tiny-deepseek", layers=("attention", "mlp", "attention", "moe"),
              attention=replace(MLA_MOE.attention, latent=_LATENT, rope=Rope(scaling=RopeScaling(
                  "yarn", 4.0, original_max_positions=8, mscale=0.7, mscale_all_dim=1.0))),
              moe=replace(MLA_MOE.moe, experts=8, shared_ffn=16, norm_topk=True, groups=4, topk_groups=2, group_top=2,
                          scaling_factor=2.5, aux_loss=0.0))


@pytest.mark.tier2
def test_plait_run_then_export_hf_gives_transformers_the_trained_model(tmp_path):
    job = tmp_path / "job.plait"
    job.write_text(format_model(E2E) + '''
train "tiny-deepseek-local" {
  model = "tiny-deepseek"
  gpus = 2
  global_batch = 4
  seq_len = 32
  precision = fp32
  optimizer = adamw(lr = 1e-2, warmup = 2)
  data = synthetic
  steps = 4
}
''')
    run = subprocess.run([sys.executable, "-m", "plait", "run", str(job), "--layout", "tp=2 sp=true ep=2",
                          "--run-dir", str(tmp_path / "run"), "--save", str(tmp_path / "ckpt")],
                         env=env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert main(["export", "hf", str(tmp_path / "ckpt"), "-o", str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    assert model_from_hf_file(str(tmp_path / "hf"), E2E.name) == E2E
    model, _ = _reference(E2E, tmp_path / "ckpt")
    diff = logit_diff(tmp_path / "hf", model)
    print(f"plait run tp2 sp ep2: plait vs transformers {diff:.1e}")  # measured (pytest -s)
    assert diff <= TOL
