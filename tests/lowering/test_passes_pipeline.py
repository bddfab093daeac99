"""trace, split_pipeline, data_parallel and the compile driver, in one process (tp = 1)."""
from dataclasses import replace

import pytest
import torch

from plait.ir.errors import LayoutError
from plait.ir.plan import Layout, Stage
from plait.lowering.build import build_model
from plait.lowering.compile import PASSES, lower, program_text, write_programs
from plait.lowering.trace import info, trace_model

from passes_util import SEQ, SPEC, lowered, plan

UNEVEN = (Stage(0, 0, 0, 4), Stage(1, 0, 4, 6))


def _batch(n=2):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, SPEC.vocab, (n, SEQ), generator=g)
    return tokens, torch.roll(tokens, -1, 1)


def test_pass_list_reads_like_a_table_of_contents():
    names = [p.name for p in PASSES]
    dense = ["shard_tensor_parallel", "sequence_parallel", "data_parallel", "split_pipeline"]
    assert [n for n in names if n in dense] == dense  # in this order, whatever else joins
    assert names[-2:] == ["split_pipeline", "recompute"]
    assert all(p.doc and p.ensures for p in PASSES)


def test_trace_records_position_kind_and_logical_shape():
    gm = trace_model(build_model(SPEC, seed=0), SPEC, 2, SEQ)
    by_target = {n.target: info(n) for n in gm.graph.nodes if n.op == "call_module"}
    q = by_target["layers.2.mixer.q_proj"]
    assert (q.layer, q.kind, q.shape) == (2, "attention", (2, SEQ, 64))
    assert by_target["layers.3.mixer.down_proj"].kind == "mlp"
    assert by_target["embed"].kind == "embed" and by_target["head"].kind == "head"
    loss = gm.graph.find_nodes(op="output")[0].all_input_nodes[0]
    assert info(loss).kind == "loss" and info(loss).shape == ()


@pytest.mark.parametrize("layout,stages", [(Layout(pp=2), UNEVEN), (Layout(pp=2, vpp=2), None),
                                           (Layout(pp=3), None)])
def test_split_program_equals_the_reference_bit_for_bit(layout, stages):
    model = build_model(SPEC, seed=0)
    tokens, labels = _batch()
    want = model(tokens, labels)
    want.backward()
    program = lower(build_model(SPEC, seed=0), SPEC, replace(plan(layout, stages), seq_len=SEQ), 0)
    got = program.pipe(tokens, labels)
    got.backward()
    assert torch.equal(got, want)
    ref = dict(model.named_parameters())
    seen = {}
    for c in range(program.num_chunks):
        for name, p in program.stage(c).named_parameters():
            assert name not in seen, f"{name} in stage{seen.get(name)} and stage{c}"
            seen[name] = c
            assert torch.equal(p.grad, ref[name].grad), name
    assert set(seen) == set(ref)


def test_uneven_stages_hold_their_layers_and_the_ends():
    program = lowered(Layout(pp=2), stages=UNEVEN)
    first = {n.split(".")[1] for n, _ in program.stage(0).named_parameters() if n.startswith("layers")}
    assert first == {"0", "1", "2", "3"}
    names1 = dict(program.stage(1).named_parameters())
    assert "head.weight" in names1 and "final_norm.weight" in names1 and "embed.weight" not in names1
    assert program.stage_io["stage0"] == ((1, SEQ), torch.int64, (1, SEQ, 64), torch.float32)


def test_virtual_stages_go_round_robin_over_pipeline_ranks():
    program = lowered(Layout(pp=2, vpp=2), rank=1)
    assert program.chunk_indices == [1, 3] and program.holds_loss
    assert lowered(Layout(pp=2, vpp=2), rank=0).chunk_indices == [0, 2]


@pytest.mark.parametrize("stages,message", [
    ((Stage(0, 0, 0, 6),), r"1 stages, but pp\*vpp = 2\*1 = 2"),
    ((Stage(0, 0, 0, 3), Stage(1, 0, 4, 6)), "must tile layers"),
    ((Stage(1, 0, 0, 3), Stage(0, 0, 3, 6)), "sits on pp rank 1"),
])
def test_bad_stage_partitions_are_rejected(stages, message):
    with pytest.raises(LayoutError, match=message):
        lowered(Layout(pp=2), stages=stages)


def test_data_parallel_pass_records_the_kind():
    assert lowered(Layout(dp=2, dp_kind="fsdp")).grad_sync.dp_kind == "fsdp"
    with pytest.raises(LayoutError, match="unknown dp_kind 'zero3'"):
        lowered(Layout(dp=2, dp_kind="zero3"))


def test_compiled_programs_are_readable_python_per_rank(tmp_path):
    programs = [lowered(Layout(pp=2, tp=2, sp=True), rank=r) for r in (0, 3)]
    files = write_programs(programs, tmp_path)
    assert (tmp_path / "plan.json").is_file() and len(files) == 1 + 2 + 3  # plan; stage0 + shards; stage1 + loss + shards
    text = program_text(programs[1])
    assert set(text) == {"stage1.py", "loss.py"}
    assert text["stage1.py"].startswith("# rank 3 (tp1 cp0 dp0 pp1) stage1: in [1, 8, 64]")
    assert "def forward(self, " in text["stage1.py"] and "torch.ops.plait.gather_seq" in text["stage1.py"]
    compile(text["stage1.py"], "stage1.py", "exec")  # valid Python
