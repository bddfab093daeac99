"""Parameter counts: exact against published counts, hand-computed tiny models, the SC'21 formula."""
import csv
from pathlib import Path

import pytest
from sc21_gpt import gpt, sc21_rows  # tests/ir/sc21_gpt.py

from plait.ir import counts
from plait.ir.errors import PlaitError
from plait.ir.hf import model_from_hf_file
from plait.ir.model import MLP, Attention, Mamba2, ModelSpec, MoE, Norm, Rope
from plait.reference import reference_file

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "specs"


def published():
    path = reference_file("published_params.csv")
    rows = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    return [(r["model"], int(r["total_params"])) for r in csv.DictReader(rows)]


@pytest.mark.parametrize("name,total", published())
def test_hf_config_counts_equal_published(name, total):
    assert counts.params(model_from_hf_file(str(SPECS / "hf" / f"{name}.json"))).total == total


@pytest.mark.parametrize("name,total", published())
def test_library_spec_counts_equal_published(name, total):
    path = SPECS / "models" / f"{name}.plait"
    if not path.exists():
        pytest.skip(f"{path.name} not in the spec library yet")
    from plait.ir.dsl import load_model
    assert counts.params(load_model(str(path), name)).total == total


@pytest.mark.parametrize("name,total", [
    ("nemotron-h-4b", 4_489_223_040),  # Nemotron-H-4B-Base-8K, the pruned 8B
    ("llama-3.1-minitron-4b-width", 4_512_746_496),  # hidden 3072, ffn 9216
    ("mixtral-8x7b", 46_702_792_704),
    ("qwen3-30b-a3b", 30_532_122_624),
])
def test_more_public_models(name, total):
    assert counts.params(model_from_hf_file(str(SPECS / "hf" / f"{name}.json"))).total == total


def tiny_dense(**overrides) -> ModelSpec:
    fields = dict(name="tiny", vocab=32, hidden=8, layers=("attention", "mlp") * 2,
                  attention=Attention(heads=2, kv_heads=1, head_dim=4, rope=Rope()),
                  mlp=MLP(ffn=16))
    fields.update(overrides)
    return ModelSpec(**fields)


def test_tiny_dense_by_hand():
    m = tiny_dense()
    # attention: q 8x8 + k 8x4 + v 8x4 + o 8x8 = 192, + pre-norm 8
    assert counts.layer_params(m, "attention") == 200
    # swiglu: gate + up 8x16 each + down 16x8 = 384, + pre-norm 8
    assert counts.layer_params(m, "mlp") == 392
    p = counts.params(m)
    assert (p.embedding, p.head, p.final_norm) == (256, 256, 8)
    assert p.total == 256 + 2 * (200 + 392) + 8 + 256 == 1704
    assert p.active == p.total and p.non_embedding == 1704 - 512
    assert p.per_kind == (("attention", 400), ("mlp", 784))
    assert counts.params_per_layer(m) == (200, 392, 200, 392)


def test_tied_embeddings_biases_qk_norm_layernorm():
    m = tiny_dense(tie_embeddings=True, norm=Norm("layernorm"),
                   attention=Attention(2, 1, 4, qkv_bias=True, out_bias=True, qk_norm=True),
                   mlp=MLP(16, activation="gelu", bias=True))
    assert counts.head_params(m) == 0
    # 192 weights + qkv bias 16 + o bias 8 + q/k norm 2*4 + layernorm (scale + bias) 16
    assert counts.layer_params(m, "attention") == 192 + 16 + 8 + 8 + 16
    # up 8x16 + 16, down 16x8 + 8, layernorm 16
    assert counts.layer_params(m, "mlp") == 128 + 16 + 128 + 8 + 16


def test_moe_active_and_expert_params():
    m = tiny_dense(layers=("attention", "moe"), mlp=None,
                   moe=MoE(experts=4, top_k=2, ffn=6, shared_ffn=10, shared_gate=True))
    one = 3 * 8 * 6  # gate, up, down
    assert counts.expert_params(m) == 4 * one
    # router 8x4 + shared gate 8x1 + experts + shared swiglu 3*8*10 + pre-norm 8
    assert counts.layer_params(m, "moe") == 32 + 8 + 4 * one + 240 + 8
    p = counts.params(m)
    assert p.total - p.active == 2 * one  # the two experts a token skips


def test_mamba_by_hand():
    mamba = Mamba2(heads=4, head_dim=2, groups=2, state=3, conv=4)
    m = tiny_dense(layers=("mamba",), attention=None, mlp=None, mamba=mamba)
    d_inner, conv_ch = 8, 8 + 2 * 2 * 3
    in_proj = 8 * (2 * d_inner + 2 * 2 * 3 + 4)
    conv = conv_ch * 4 + conv_ch
    expected = in_proj + conv + 3 * 4 + d_inner + d_inner * 8 + 8  # + dt/A/D, gated norm, out, pre-norm
    assert counts.layer_params(m, "mamba") == expected


@pytest.mark.parametrize("row", sc21_rows(), ids=lambda r: r["params_billion"])
def test_gpt_family_matches_sc21_parameter_formula(row):
    h, l, heads = int(row["hidden"]), int(row["layers"]), int(row["heads"])
    V, s = 51200, 2048
    total = counts.params(gpt(h, l, heads)).total
    # SC'21 appendix: P = 12 l h^2 (1 + 13/(12h) + (V + s)/(12 l h)); it leaves out the final
    # layernorm's 2h.
    assert total == 12 * l * h * h + 13 * l * h + (V + s) * h + 2 * h
    assert round(total / 1e9, 1) == float(row["params_billion"])  # Table 1's rounding


@pytest.mark.parametrize("path", sorted((SPECS / "hf").glob("*.json")), ids=lambda p: p.stem)
def test_library_spec_agrees_with_its_hf_config(path):
    library = SPECS / "models" / f"{path.stem}.plait"
    if not library.exists():
        pytest.skip(f"{library.name} is not in the spec library")
    from plait.ir.dsl import load_model
    ours, theirs = load_model(str(library), path.stem), model_from_hf_file(str(path))
    assert counts.params(ours) == counts.params(theirs)
    assert ours.layers == theirs.layers
    assert counts.flops_per_token(ours, 4096) == counts.flops_per_token(theirs, 4096)


def test_learned_positions_need_max_seq():
    assert counts.embedding_params(tiny_dense(learned_positions=True, max_seq=10)) == 32 * 8 + 10 * 8
    with pytest.raises(PlaitError, match="max_seq"):
        counts.embedding_params(tiny_dense(learned_positions=True))


def test_latent_attention_by_hand():
    from plait.ir.model import LatentKV
    lat = LatentKV(kv_lora_rank=6, qk_nope_head_dim=3, qk_rope_head_dim=2, v_head_dim=4, q_lora_rank=5)
    m = tiny_dense(attention=Attention(heads=2, kv_heads=2, head_dim=5, rope=Rope(), latent=lat))
    # q_a 8x5 + q_a_layernorm 5 + q_b 5x10 + kv_a 8x8 + kv_a_layernorm 6 + kv_b 6x14 + o 8x8, + pre-norm 8
    assert counts.layer_params(m, "attention") == 40 + 5 + 50 + 64 + 6 + 84 + 64 + 8


def test_deepseek_v3_main_model_without_mtp():
    """The 61-layer main model of the public config (transformers' meta-device count, checked in
    test_hf_import_counts): DeepSeek's 671B includes no MTP module, whose 11.5B unique parameters
    (README_WEIGHTS of the DeepSeek-V3 release) are not imported."""
    m = model_from_hf_file(str(SPECS / "hf" / "deepseek-v3.json"))
    assert counts.params(m).total == DEEPSEEK_V3_MAIN


DEEPSEEK_V3_MAIN = 671_026_404_352  # transformers 5.x, AutoModelForCausalLM on the meta device
