"""counts/fsdp.py: the per-tensor rows of each layer kind add up to the parameter counts (the one
source of those), and FSDP2's dim-0 padding is what torch's fully_shard allocates."""
from pathlib import Path

import pytest
import torch

from plait.ir import counts
from plait.ir.dsl import load_model
from plait.lowering.build import build_model

MODELS = sorted((Path(__file__).resolve().parents[2] / "specs" / "models").glob("*.plait"))


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.stem)
def test_rows_add_up_to_the_parameter_counts(path):
    model = load_model(str(path))
    for kind in set(model.layers):
        dense, expert = counts.layer_rows(model, kind)
        assert counts.params_of(dense) + counts.params_of(expert) == counts.layer_params(model, kind), kind
    own = model.tie_embeddings
    assert counts.params_of(counts.embedding_rows(model)) == counts.embedding_params(model)
    assert counts.params_of(counts.head_rows(model, own_copy=own)) == (
        counts.final_norm_params(model) + counts.head_params(model) + (model.vocab * model.hidden if own else 0))


def test_rows_are_the_reference_modules_tensors():
    """tiny-moe's reference module on the meta device: the same (rows, row size) multiset per layer."""
    model = load_model("specs/models/tiny-moe.plait")
    with torch.device("meta"):
        ref = build_model(model, device="meta", seed=0)
    for i, kind in enumerate(model.layers):
        got = sorted((p.shape[0], p[0].numel()) for p in ref.layers[i].parameters())
        dense, expert = counts.layer_rows(model, kind)
        assert got == sorted(dense + expert), (i, kind)


def test_fsdp_pads_dim0_to_a_multiple_of_the_shards():
    # tiny-moe's shared-expert gate [1, 128] over 2 ranks: one row of padding, 128 parameters
    model = load_model("specs/models/tiny-moe.plait")
    dense, expert = counts.layer_rows(model, "moe")
    assert counts.fsdp_padding(dense, 2) == 128 and counts.fsdp_padding(expert, 2) == 0
    assert counts.fsdp_padding(dense, 3) == sum((-n % 3) * r for n, r in dense) > 128
    assert counts.fsdp_padding(((7, 10),), 4) == 10  # 7 rows -> 8: rank 0 holds 2 rows = (70 + 10) / 4


@pytest.mark.parametrize("name, layout", [
    ("tiny-moe", dict(tp=2, sp=True, ep=2)), ("tiny-hybrid", dict(tp=2, sp=True, etp=2))])
def test_rows_under_tp_and_ep_are_the_lowered_ranks_tensors(name, layout):
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
        got = sorted((p.shape[0], p[0].numel()) for n, p in params.items() if n.startswith(f"layers.{i}."))
        dense, expert = counts.layer_rows(model, kind, lay.tp, lay.ep, lay.etp)
        assert got == sorted(dense + expert), (i, kind)
    assert sorted((p.shape[0], p[0].numel()) for n, p in params.items() if n.startswith("embed")) \
        == sorted(counts.embedding_rows(model, lay.tp))
