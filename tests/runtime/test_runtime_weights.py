"""Sharded runs read only their slice of a Hugging Face checkpoint."""
import pytest
import torch
import transformers

from plait.ir.errors import PlaitError
from plait.ir.hf import model_from_hf_config
from plait.ir.plan import Layout, ParallelPlan, even_stages
from plait.lowering.build import build_model
from plait.lowering.compile import dense_layout, lower
from plait.lowering.weights import load_hf_weights
from plait.runtime.train import load_sharded_weights

CFG = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
           max_position_embeddings=64, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**CFG))
    out = tmp_path_factory.mktemp("ckpt")
    hf.save_pretrained(out, safe_serialization=True)
    return out, model_from_hf_config(hf.config.to_dict())


def test_each_rank_loads_its_tp_slice_of_its_stages(checkpoint):
    path, spec = checkpoint
    full = build_model(spec, seed=5)
    load_hf_weights(full, str(path), spec)
    layout = dense_layout(Layout(tp=2, pp=2))
    plan = ParallelPlan(job="w", model=spec.name, cluster="local-cpu", world=4, layout=layout,
                        stages=even_stages(spec.num_layers, 2), global_batch=4, seq_len=16)
    program = lower(build_model(spec, seed=9), spec, plan, rank=3)  # tp rank 1, last stage
    loaded = load_sharded_weights(program, str(path), spec)
    reference = dict(full.named_parameters())
    local = program.local_parameters()
    assert set(loaded) == set(local) and "embed.weight" not in local
    for name, p in local.items():
        s = program.shards.get(name)
        want = reference[name] if s is None else reference[name].chunk(s.parts, s.dim)[s.index]
        assert torch.equal(p, want), name


def test_a_missing_checkpoint_names_its_path(checkpoint, tmp_path):
    _, spec = checkpoint
    layout = dense_layout(Layout())
    plan = ParallelPlan(job="w", model=spec.name, cluster="local-cpu", world=1, layout=layout,
                        stages=even_stages(spec.num_layers, 1), global_batch=1, seq_len=16)
    program = lower(build_model(spec, seed=0), spec, plan, rank=0)
    with pytest.raises(PlaitError, match=str(tmp_path / "absent")):
        load_sharded_weights(program, str(tmp_path / "absent"), spec)
