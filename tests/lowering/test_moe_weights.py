"""An expert-parallel rank reads only its experts (EP) and their FFN columns (ETP) of a Hugging
Face MoE checkpoint (transformers 5 fused gate_up_proj: gate rows first)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from plait.ir.hf import model_from_hf_config  # noqa: E402
from plait.ir.plan import Layout, ParallelPlan, even_stages  # noqa: E402
from plait.lowering.build import build_model  # noqa: E402
from plait.lowering.compile import lower  # noqa: E402
from plait.lowering.moe import shard_experts  # noqa: E402
from plait.lowering.weights import load_hf_weights  # noqa: E402
from plait.runtime.train import load_sharded_weights  # noqa: E402

torch.set_num_threads(1)

CFG = dict(model_type="qwen2_moe", vocab_size=96, hidden_size=32, intermediate_size=48,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
           num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
           shared_expert_intermediate_size=24, norm_topk_prob=False, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**CFG))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("moe-ckpt")
    hf.save_pretrained(out, safe_serialization=True)
    return out, model_from_hf_config(hf.config.to_dict())


@pytest.mark.parametrize("layout, rank", [(Layout(dp=4, ep=2, etp=2), 3), (Layout(dp=2, ep=2), 1)])
def test_rank_loads_its_expert_shard(checkpoint, layout, rank):
    path, spec = checkpoint
    full = build_model(spec, seed=5)
    load_hf_weights(full, str(path), spec)
    plan = ParallelPlan(job="w", model=spec.name, cluster="local-cpu", world=layout.world, layout=layout,
                        stages=even_stages(spec.num_layers, 1), global_batch=layout.dp, seq_len=16)
    program = lower(build_model(spec, seed=9), spec, plan, rank=rank)
    loaded = load_sharded_weights(program, str(path), spec)
    local, reference = program.local_parameters(), dict(full.named_parameters())
    assert set(loaded) == set(local)
    for layer in (i for i, kind in enumerate(spec.layers) if kind == "moe"):
        path_ = f"layers.{layer}.mixer"
        grid = program.stage(0).get_submodule(path_).grid
        up, down = shard_experts(reference[f"{path_}.experts.w_gate_up"],
                                 reference[f"{path_}.experts.w_down"], grid, gated=True)
        assert torch.equal(local[f"{path_}.experts.w_gate_up"], up)
        assert torch.equal(local[f"{path_}.experts.w_down"], down)
        assert torch.equal(local[f"{path_}.router.weight"], reference[f"{path_}.router.weight"])
