"""Tensor-parallel Mamba2 on shapes (no processes): segmented shards of in_proj / conv, per-head
vectors, row-parallel out_proj; the shards reassemble into the reference parameters."""
from dataclasses import replace

import pytest
import torch

from plait.ir.dsl import load_model
from plait.ir.errors import LayoutError
from plait.ir.plan import Layout, ParallelPlan, even_stages
from plait.lowering.build import build_model
from plait.lowering.compile import dense_layout, lower
from plait.lowering.passes.shard_tensor_parallel import ShardSpec

torch.set_num_threads(1)
SPEC = load_model("specs/models/tiny-hybrid.plait")


def plan(layout: Layout, spec=SPEC, seq=16) -> ParallelPlan:
    layout = dense_layout(layout)
    return ParallelPlan(job="t", model=spec.name, cluster="local-cpu", world=layout.world,
                        layout=layout, stages=even_stages(spec.num_layers, layout.pp),
                        global_batch=4, seq_len=seq)


def test_segmented_shard_spec_takes_each_component_and_reassembles():
    full = torch.arange(2 * (4 + 6 + 2)).reshape(12, 2)
    specs = [ShardSpec("tp", 0, 2, i, (4, 6, 2)) for i in range(2)]
    pieces = [s.take(full) for s in specs]
    assert pieces[0][:, 0].tolist() == [0, 2, 8, 10, 12, 20]  # rows 0-1, 4-6, 10
    assert torch.equal(specs[0].assemble(pieces), full)
    for spec, piece in zip(specs, pieces):  # the index a weight loader reads
        rows = spec.slices(tuple(full.shape))[0]
        assert torch.equal(torch.cat([full[r] for r in rows]), piece)
    plain = ShardSpec("tp", 1, 2, 1)
    assert torch.equal(plain.take(full), full[:, 1:])
    assert plain.slices((12, 2)) == (slice(None), slice(1, 2))


def test_mamba_mixer_shards_reassemble_into_the_reference(tp=2):
    reference = dict(build_model(SPEC, seed=0).named_parameters())
    programs = [lower(build_model(SPEC, seed=0), SPEC, plan(Layout(tp=tp, dp=1)), r)
                for r in range(tp)]
    m = SPEC.mamba
    local = programs[0].local_parameters()
    assert local["layers.0.mixer.in_proj.weight"].shape == (m.in_proj_out // tp, SPEC.hidden)
    assert local["layers.0.mixer.conv1d.weight"].shape[0] == m.conv_channels // tp
    assert local["layers.0.mixer.A_log"].shape == (m.heads // tp,)
    assert local["layers.0.mixer.out_proj.weight"].shape == (SPEC.hidden, m.d_inner // tp)
    assert "layers.0.norm.weight" not in programs[0].shards  # the pre-norm stays whole
    for name, spec in programs[0].shards.items():
        pieces = [p.local_parameters()[name] for p in programs]
        assert torch.equal(spec.assemble(pieces), reference[name]), name
    in_proj = programs[1].shards["layers.0.mixer.in_proj.weight"]
    assert in_proj.segments == (m.d_inner, m.d_inner, m.groups * m.state, m.groups * m.state,
                                m.heads)


def test_mamba_groups_not_divisible_by_tp_is_a_layout_error():
    spec = replace(SPEC, mamba=replace(SPEC.mamba, groups=1))
    with pytest.raises(LayoutError,
                       match=r"mamba groups \(1\) must be divisible by tp \(2\): 1 % 2 = 1"):
        lower(build_model(spec, seed=0), spec, plan(Layout(tp=2), spec), 0)


def test_tp_mamba_program_text_reads_local_sizes():
    program = lower(build_model(SPEC, seed=0), SPEC, plan(Layout(tp=2, sp=True)), 1)
    code = program.stage(0).code
    assert "plait.gather_seq" in code and "plait.scatter_seq" in code
    assert "ssd_scan" in code and "causal_conv1d" in code
