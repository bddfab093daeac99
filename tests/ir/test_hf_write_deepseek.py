"""ModelSpec -> DeepSeek-V3 config.json (ir/hf_write.py, the fields from ir/hf_deepseek.py): the
library's DeepSeek-V3 spec writes the public config's architecture fields, reads back as itself,
and transformers' DeepseekV3Config takes it; latent attention picks the family; what DeepSeek-V3
(or any family) cannot say is refused with the feature named."""
import json
from dataclasses import replace
from pathlib import Path

import pytest

from plait.ir.dsl import load_model
from plait.ir.errors import PlaitError
from plait.ir.hf import model_from_hf_config
from plait.ir.hf_write import hf_config, infer_family
from plait.ir.model import Mamba2

ROOT = Path(__file__).resolve().parents[2]
SPEC = load_model(str(ROOT / "specs" / "models" / "deepseek-v3.plait"))
PUBLIC = json.loads((ROOT / "specs" / "hf" / "deepseek-v3.json").read_text())
# The public config's legacy rope spelling, DeepSeek's MTP depth (plait exports the main model: 0)
# and bookkeeping differ by design; every other field plait writes must equal the public one.
NOT_COMPARED = {"rope_scaling", "rope_theta", "num_nextn_predict_layers", "dtype", "torch_dtype"}


def test_library_deepseek_v3_writes_the_public_config_and_reads_back_as_itself():
    assert infer_family(SPEC) == "deepseek_v3"
    cfg = hf_config(SPEC)
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["num_nextn_predict_layers"] == 0
    shared = sorted(set(cfg) & set(PUBLIC) - NOT_COMPARED)
    assert {k: cfg[k] for k in shared} == {k: PUBLIC[k] for k in shared}
    assert len(shared) >= 25  # every MLA, MoE and layer-count field is among them
    legacy = dict(PUBLIC["rope_scaling"], rope_type="yarn", rope_theta=PUBLIC["rope_theta"])
    del legacy["type"]
    assert cfg["rope_parameters"] == legacy  # with YaRN's mscale / mscale_all_dim
    assert model_from_hf_config(json.loads(json.dumps(cfg)), SPEC.name) == SPEC


def test_transformers_reads_the_written_config():
    transformers = pytest.importorskip("transformers")
    cfg = hf_config(SPEC)
    hf = transformers.AutoConfig.for_model(**cfg)
    assert type(hf).__name__ == "DeepseekV3Config"
    assert (hf.qk_head_dim, hf.head_dim, hf.num_local_experts) == (192, 64, 256)
    assert model_from_hf_config(hf.to_dict(), SPEC.name) == SPEC  # as save_pretrained writes it


def test_without_q_lora_dense_only_and_balancing_loss_round_trip():
    lat = replace(SPEC.attention.latent, q_lora_rank=None, rope_interleave=False)
    dense = replace(SPEC, attention=replace(SPEC.attention, latent=lat), moe=None,
                    layers=("attention", "mlp") * 2)
    assert hf_config(dense)["first_k_dense_replace"] == 2
    balanced = replace(SPEC, moe=replace(SPEC.moe, aux_loss=0.01))
    assert model_from_hf_config(hf_config(balanced), SPEC.name) == balanced


REFUSED = {
    "mla-in-a-hybrid": (dict(layers=("mamba", "attention", "moe"),
                             mamba=Mamba2(heads=8, head_dim=64, groups=1, state=16)),
                        "multi-head latent attention outside"),
    "softmax-router": (dict(moe=replace(SPEC.moe, router="softmax", expert_bias=False)),
                       "routes by sigmoid scores with the expert bias"),
    "shared-expert-gate": (dict(moe=replace(SPEC.moe, shared_gate=True)), "no shared-expert gate"),
    "half-a-shared-expert": (dict(moe=replace(SPEC.moe, shared_ffn=1024)), "n_shared_experts >= 1"),
    "no-shared-expert": (dict(moe=replace(SPEC.moe, shared_ffn=0)), "n_shared_experts >= 1"),
    "megatron-group-score": (dict(moe=replace(SPEC.moe, group_top=0)), "2: the same routing"),
    "group-score-of-3": (dict(moe=replace(SPEC.moe, group_top=3)), "group_top is 3$"),
    "dense-after-moe": (dict(layers=("attention", "moe", "attention", "mlp")), "dense feed-forward after MoE"),
    "qk-norm": (dict(attention=replace(SPEC.attention, qk_norm=True)), "no projection biases, q/k norms"),
    "no-rope": (dict(attention=replace(SPEC.attention, rope=None)), "rotates its qk_rope_head_dim dims"),
    "z-loss": (dict(moe=replace(SPEC.moe, z_loss=1e-3)), "its moe would read back"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_deepseek_v3_cannot_say_is_refused_by_name(case):
    change, message = REFUSED[case]
    with pytest.raises(PlaitError, match=message):
        hf_config(replace(SPEC, **change))


def test_sigmoid_routing_under_plain_attention_has_no_family():
    plain = replace(SPEC, attention=replace(SPEC.attention, latent=None, head_dim=128, kv_heads=8))
    with pytest.raises(PlaitError, match="sigmoid scores / expert bias under plain attention"):
        infer_family(plain)
    with pytest.raises(PlaitError, match="no multi-head latent attention"):
        hf_config(plain, family="deepseek_v3")
    with pytest.raises(PlaitError, match="cannot be written as a llama config"):
        hf_config(SPEC, family="llama")  # latent attention is no llama attention
