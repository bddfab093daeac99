"""counts/fsdp.py: the per-tensor shapes of each layer kind add up to the parameter counts (the
one source of those) and are the modules' tensors; FSDP's shard dim and padding."""
from pathlib import Path

import pytest
import torch

from plait.ir import counts
from plait.ir.dsl import load_model
from plait.lowering.build import build_model

MODELS = sorted((Path(__file__).resolve().parents[2] / "specs" / "models").glob("*.plait"))


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.stem)
def test_shapes_add_up_to_the_parameter_counts(path):
    model = load_model(str(path))
    for kind in set(model.layers):
        dense, expert = counts.layer_shapes(model, kind)
        assert counts.params_of(dense) + counts.params_of(expert) == counts.layer_params(model, kind), kind
    own = model.tie_embeddings
    assert counts.params_of(counts.embedding_shapes(model)) == counts.embedding_params(model)
    assert counts.params_of(counts.head_shapes(model, own_copy=own)) == (
        counts.final_norm_params(model) + counts.head_params(model) + (model.vocab * model.hidden if own else 0))


def test_shapes_are_the_reference_modules_tensors():
    """tiny-moe's reference module on the meta device: the same (rows, row size) multiset per layer."""
    model = load_model("specs/models/tiny-moe.plait")
    with torch.device("meta"):
        ref = build_model(model, device="meta", seed=0)
    for i, kind in enumerate(model.layers):
        got = sorted(tuple(p.shape) for p in ref.layers[i].parameters())
        dense, expert = counts.layer_shapes(model, kind)
        assert got == sorted(dense + expert), (i, kind)


def test_fsdp_shards_the_first_even_dim_and_pads_only_when_there_is_none():
    assert counts.fsdp_shard_dim((1, 128), 2) == 1  # tiny-moe's shared-expert gate
    assert counts.fsdp_shard_dim((1, 2 * 16384, 6144), 16) == 1  # one Mixtral expert over 16 ranks
    assert counts.fsdp_shard_dim((7, 3), 4) == 0 and counts.fsdp_padding(((7, 3),), 4) == 3
    assert counts.fsdp_padding(((7,), (8, 3), (1, 128)), 4) == 1  # [7] -> 8 rows; the others even
    model = load_model("specs/models/tiny-moe.plait")
    for kind in set(model.layers):
        assert counts.fsdp_padding(sum(counts.layer_shapes(model, kind), ()), 2) == 0, kind
    # 3 ranks divide no dim of any: norm [128] +1, router [8, 128] +1 row, gate [1, 128] +2 rows,
    # shared gate/up [256, 128] +2 rows each, shared down [128, 256] +1 row
    dense, _ = counts.layer_shapes(model, "moe")
    assert counts.fsdp_padding(dense, 3) == 1 + 128 + 2 * 128 + 2 * 2 * 128 + 256


@pytest.mark.parametrize("name, layout", [
    ("tiny-moe", dict(tp=2, sp=True, ep=2)), ("tiny-hybrid", dict(tp=2, sp=True, etp=2))])
def test_shapes_under_tp_and_ep_are_the_lowered_ranks_tensors(name, layout):
    """One rank of a lowered TP x EP program holds exactly the listed local tensors per layer
    (column / row / segmented splits, replicated router and gate, EP-local experts)."""
    from plait.ir.plan import Layout, ParallelPlan, even_stages
    from plait.lowering.compile import lower

    model = load_model(f"specs/models/{name}.plait")
    lay = Layout(**layout)
    plan = ParallelPlan(job="t", model=model.name, cluster="local-cpu", world=lay.world, layout=lay,
                        stages=even_stages(model.num_layers, 1, 1), global_batch=1, seq_len=32)
    params = lower(build_model(model, seed=0), model, plan, rank=0).local_parameters()
    for i, kind in enumerate(model.layers):
        got = sorted(tuple(p.shape) for n, p in params.items() if n.startswith(f"layers.{i}."))
        dense, expert = counts.layer_shapes(model, kind, lay.tp, lay.ep, lay.etp)
        assert got == sorted(dense + expert), (i, kind)
    assert sorted(tuple(p.shape) for n, p in params.items() if n.startswith("embed")) \
        == sorted(counts.embedding_shapes(model, lay.tp))
