"""Tier 2: a tiny DeepSeek-V3-shaped model (multi-head latent attention with a q LoRA rank and
YaRN, one dense layer then a sigmoid-routed MoE with expert bias, group-limited top-k and a shared
expert) reproduces one device under TP2 with sequence parallelism (the heads of q_b_proj /
kv_b_proj / o_proj split, the latent down-projections replicated with TP-summed gradients), TP2 x
EP2 folded onto the same two ranks, PP2, ring CP2 (per-head K and V exchanged; v heads narrower
than q/k heads take the math kernels), and its dense twin under plain TP2 (MoE layers need SP
under TP) and all-to-all CP2 (gloo, world 2, one spawn); on four ranks (a second spawn) EP4 and
TP2 x EP2 with expert TP2 (dense tp2 sp dp2 | experts etp2 ep2). Tolerance as test_runtime_parity:
loss and every gradient of the first step within 1e-5 in fp32 (sums reordered by the layout, ~1e-7
apart)."""
import pytest

from dataclasses import replace

from plait.ir.dsl import parse_text
from plait.ir.plan import Layout
from plait.runtime.harness.parity import Case, Setup, run_parity

MLA_MOE = parse_text('''model "tiny-mla-moe" {
  vocab = 256
  hidden = 64
  norm = rmsnorm(eps = 1e-6)
  max_seq = 256
  attention {
    heads = 4
    latent = mla(kv_lora_rank = 32, qk_nope_head_dim = 16, qk_rope_head_dim = 8, v_head_dim = 12,
                 q_lora_rank = 48)
    rope = rope(theta = 10000, scaling = yarn(factor = 4, original_max_positions = 8, mscale = 0.7,
                                              mscale_all_dim = 1))
  }
  mlp { ffn = 128 }
  moe { experts = 8, top_k = 2, ffn = 32, shared_ffn = 32, router = sigmoid, expert_bias = true, groups = 4,
        topk_groups = 2, group_top = 2, scaling_factor = 2.5 }
  layers = [attention, mlp] + [attention, moe]
}
''').models["tiny-mla-moe"]
MLA_DENSE = replace(MLA_MOE, name="tiny-mla", layers=("attention", "mlp") * 2, moe=None)
SETUP = Setup(MLA_MOE, global_batch=4, seq=16, steps=1)
FP32_TOL = 1e-5

CASES = [
    Case("tp2_dense", Layout(tp=2, dp_kind="replicated"), spec=MLA_DENSE),
    Case("tp2_sp", Layout(tp=2, sp=True)),
    Case("tp2_sp_ep2", Layout(tp=2, sp=True, ep=2)),
    Case("pp2", Layout(pp=2)),
    Case("cp2_ring", Layout(cp=2, dp_kind="replicated")),
    Case("cp2_alltoall_dense", Layout(cp=2, cp_comm="alltoall", dp_kind="replicated"), spec=MLA_DENSE),
    # world 4 (a second spawn): two of the eight experts per rank, and TP2 x EP2 with each
    # expert's FFN split over ETP2 too (dense tp2 sp dp2 | etp2 ep2)
    Case("ep4", Layout(dp=4, ep=4)),
    Case("tp2_sp_ep2_etp2", Layout(tp=2, sp=True, dp=2, ep=2, etp=2)),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_parity(SETUP, CASES, str(tmp_path_factory.mktemp("mla")))


@pytest.mark.tier2
@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_mla_moe_matches_one_device(results, name):
    assert results[name].loss < FP32_TOL, results[name]
    assert results[name].grads < FP32_TOL, results[name]
