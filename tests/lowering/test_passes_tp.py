"""shard_tensor_parallel and sequence_parallel on shapes, states and program text (no processes)."""
from dataclasses import replace

import pytest
import torch

from plait.ir.errors import LayoutError
from plait.ir.model import Attention, ModelSpec, Rope
from plait.ir.plan import Layout
from plait.lowering import sharding
from plait.lowering.build import build_model
from plait.lowering.passes.base import Target, VerifyError
from plait.lowering.passes.sequence_parallel import SEQUENCE_PARALLEL
from plait.lowering.passes.shard_tensor_parallel import SHARD_TENSOR_PARALLEL, ShardSpec
from plait.lowering.trace import trace_model

from passes_util import SEQ, SPEC, lowered, ops, plan


def _tp_graph(tp=2, rank=1, sp=False, spec=SPEC):
    gm = trace_model(build_model(spec, seed=0), spec, 1, SEQ)
    target = Target(spec=spec, plan=plan(Layout(tp=tp, sp=sp), spec=spec), tp_rank=rank)
    gm = SHARD_TENSOR_PARALLEL(gm, target)
    return SEQUENCE_PARALLEL(gm, target), target


def test_column_row_and_vocab_shards_hold_this_ranks_slice():
    full = dict(build_model(SPEC, seed=0).named_parameters())
    gm, _ = _tp_graph(rank=1)
    local = dict(gm.named_parameters())
    shards = gm.meta["plait.shards"]
    assert shards["layers.0.mixer.q_proj.weight"] == ShardSpec("tp", 0, 2, 1)
    assert shards["layers.0.mixer.o_proj.weight"] == ShardSpec("tp", 1, 2, 1)
    assert shards["embed.weight"] == ShardSpec("tp", 0, 2, 1)
    for name, s in shards.items():
        assert torch.equal(local[name], full[name].chunk(2, s.dim)[1]), name
    # row-parallel biases and norms stay whole
    assert "layers.0.mixer.o_proj.bias" not in shards
    assert torch.equal(local["layers.0.mixer.o_proj.bias"], full["layers.0.mixer.o_proj.bias"])
    assert local["layers.1.mixer.down_proj.weight"].shape == (64, 48)


def test_every_mixer_is_one_tp_region_with_one_entry_and_one_exit():
    gm, _ = _tp_graph()
    mixers = SPEC.num_layers
    assert ops(gm, "copy_to_tp") == mixers + 1  # + the LM head's entry
    assert ops(gm, "reduce_from_tp") == mixers + 1  # + the embedding's reduction
    states = sharding.propagate(gm)
    loss = gm.graph.find_nodes(op="output")[0].all_input_nodes[0]
    assert states[loss] == sharding.R
    assert "vocab_parallel_cross_entropy" in gm.code


def test_sequence_parallel_swaps_boundaries_for_gather_and_scatter():
    gm, _ = _tp_graph(sp=True)
    assert ops(gm, "copy_to_tp") == ops(gm, "reduce_from_tp") == 0
    assert ops(gm, "gather_seq") == SPEC.num_layers + 1
    assert ops(gm, "scatter_seq") == SPEC.num_layers + 1
    assert "torch.ops.plait.gather_seq.default(" in gm.code


def test_sequence_parallel_stage_boundaries_carry_a_sequence_shard():
    program = lowered(Layout(tp=2, pp=2, sp=True), rank=0)
    in_shape, _, out_shape, _ = program.stage_io["stage1"]
    assert in_shape == (1, SEQ // 2, SPEC.hidden)
    assert program.stage_io["stage0"][2] == (1, SEQ // 2, SPEC.hidden)
    # the last stage hands the loss this rank's vocabulary columns of the logits
    assert out_shape == (1, SEQ, SPEC.vocab // 2)


def test_replicated_weights_inside_tp_or_sp_regions_get_a_tp_gradient_sum():
    plain = lowered(Layout(tp=2)).grad_sync.tp_sum
    assert set(plain) == {f"layers.{i}.mixer.{n}_norm.weight" for i in (0, 2, 4) for n in "qk"}
    sp = set(lowered(Layout(tp=2, sp=True)).grad_sync.tp_sum)
    assert {f"layers.{i}.norm.weight" for i in range(6)} | {"final_norm.weight"} <= sp
    assert "layers.0.mixer.o_proj.bias" in sp  # added after the reduce-scatter: sequence-sharded
    assert "layers.0.mixer.o_proj.bias" not in plain


def test_indivisible_tp_is_rejected_with_the_arithmetic():
    with pytest.raises(LayoutError, match=r"vocab \(256\) must be divisible by tp \(3\): 256 % 3 = 1"):
        _tp_graph(tp=3, rank=0)


def test_sequence_parallel_needs_seq_divisible_by_tp():
    gm = trace_model(build_model(SPEC, seed=0), SPEC, 1, SEQ)
    gm = SHARD_TENSOR_PARALLEL(gm, Target(spec=SPEC, plan=plan(Layout(tp=2))))
    bad = Target(spec=SPEC, plan=replace(plan(Layout(tp=2, sp=True)), seq_len=15))
    with pytest.raises(LayoutError, match="15 % 2 = 1"):
        SEQUENCE_PARALLEL(gm, bad)


def test_sequence_parallel_requires_the_tensor_parallel_fact():
    gm = trace_model(build_model(SPEC, seed=0), SPEC, 1, SEQ)
    with pytest.raises(VerifyError, match="requires"):
        SEQUENCE_PARALLEL(gm, Target(spec=SPEC, plan=plan(Layout(tp=2, sp=True))))


def test_verifier_catches_a_wrongly_sharded_weight():
    gm, target = _tp_graph()
    mod = gm.get_submodule("layers.0.mixer.k_proj")
    mod.weight = torch.nn.Parameter(mod.weight.detach()[:8].clone())
    with pytest.raises(VerifyError, match="k_proj.weight: local shape"):
        SHARD_TENSOR_PARALLEL.verify(gm, target)


def test_mixing_a_sequence_shard_with_a_tensor_shard_is_a_conflict():
    gm, _ = _tp_graph(sp=True)
    gather = next(n for n in gm.graph.nodes if str(n.target).startswith("plait.gather_seq"))
    column = next(n for n in gather.users if n.op == "call_module")
    with gm.graph.inserting_after(column):
        bad = gm.graph.call_function(torch.add, (column, gather.args[0]))
    with pytest.raises(sharding.ShardingConflict, match="mixes"):
        sharding.propagate(gm)
    gm.graph.erase_node(bad)


def test_tied_embeddings_share_the_vocab_shard():
    spec = ModelSpec(**{**SPEC.__dict__, "tie_embeddings": True})
    gm, _ = _tp_graph(spec=spec)
    assert "head.weight" not in gm.meta["plait.shards"]
    assert dict(gm.named_parameters())["embed.weight"].shape == (128, 64)
    assert sharding.propagate(gm)


def test_latent_attention_splits_heads_and_sums_the_latent_gradients():
    """MLA under TP (Megatron-Core's split): q_b_proj / kv_b_proj column-parallel by heads, o_proj
    row-parallel, the latent down-projections and their norms replicated with a TP gradient sum."""
    from plait.ir.model import LatentKV
    lat = LatentKV(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, q_lora_rank=48)
    spec = replace(SPEC, attention=Attention(heads=4, kv_heads=4, head_dim=24, rope=Rope(), latent=lat))
    program = lowered(Layout(tp=2), spec=spec)
    shards = program.shards
    mixer = "layers.0.mixer"
    assert {k: (v.dim, v.parts) for k, v in shards.items() if k.startswith(mixer)} == {
        f"{mixer}.q_b_proj.weight": (0, 2), f"{mixer}.kv_b_proj.weight": (0, 2), f"{mixer}.o_proj.weight": (1, 2)}
    replicated = {f"layers.{i}.mixer.{n}.weight" for i in (0, 2, 4)
                  for n in ("q_a_proj", "q_a_layernorm", "kv_a_proj_with_mqa", "kv_a_layernorm")}
    assert set(program.grad_sync.tp_sum) == replicated
