"""Long context in the planner: the UltraLong jobs (128K, 1M tokens) plan with context parallelism,
the cost terms of CP attention (ring vs all-to-all) and of Mamba under CP, the cp_comm pin."""
from dataclasses import replace

import pytest

from plait.ir.dsl import load_job, parse_text
from plait.ir.errors import LayoutError, SpecError
from plait.ir.plan import Layout
from plait.kinds.attention import cost as attention_cost
from plait.kinds.mamba import cost as mamba_cost
from plait.planner.cost import compute, pipeline
from plait.planner.cost.context import Context
from plait.planner.layouts import check_pins, job_pins
from plait.planner.search import search

from conftest import job, nemotron_h_8b


@pytest.fixture(scope="module")
def ultralong_1m():
    return load_job("specs/jobs/llama-3.1-8b-ultralong-1m.plait")


def test_ultralong_1m_job_is_yarn_scaled_and_plans_with_context_parallelism(ultralong_1m):
    rope = ultralong_1m.model.attention.rope
    assert ultralong_1m.seq_len == 2**20 and rope.scaling.kind == "yarn"
    assert (rope.scaling.factor, rope.scaling.beta_fast, rope.scaling.beta_slow) == (128, 4, 1)
    result = search(ultralong_1m, top=2)
    best = result.best
    assert best is not None and best.layout.cp >= 16
    # every rank holds seq / cp tokens; the attention core (s^2) dominates the model FLOPs
    assert best.prediction.peak_memory < ultralong_1m.cluster.device.memory
    assert 0.2 < best.prediction.mfu < 0.7


def test_ultralong_128k_job_plans():
    plan = search(load_job("specs/jobs/llama-3.1-8b-ultralong-128k.plait"), top=1).best
    assert plan is not None and plan.seq_len == 128 * 1024 and plan.layout.cp > 1


def test_ring_hides_behind_the_attention_core_and_alltoall_does_not():
    """At 128K the core outlasts the ring's exchange: the ring hides overlap_p2p of it (the rest
    is what the NCCL kernels cost the core beside them); Ulysses waits for its all-to-all."""
    llama = load_job("specs/jobs/llama-3.1-8b-ultralong-128k.plait")
    for cp_comm, exposed in (("ring", 1 - Context(llama, Layout()).cal.overlap_p2p),
                             ("alltoall", 1.0)):
        ctx = Context(llama, Layout(tp=1, cp=8, dp=32, mbs=1, cp_comm=cp_comm))
        work = compute.block_work(ctx, "attention")
        fwd, _ = pipeline.block_comm(ctx, "attention", work)
        assert attention_cost.cp_comm(ctx) > 0
        assert work.core > attention_cost.cp_comm(ctx)
        assert fwd["cp"] == pytest.approx(exposed * attention_cost.cp_comm(ctx), rel=1e-12)


def test_mamba_cp_traffic_does_not_grow_with_the_sequence(h100_cluster):
    short = job(nemotron_h_8b(), h100_cluster(8), global_batch=8, seq_len=32768)
    long = replace(short, seq_len=4 * 32768)
    lay = Layout(tp=2, cp=4, dp=1, sp=True)
    assert mamba_cost.cp_comm(Context(short, lay)) == mamba_cost.cp_comm(Context(long, lay)) > 0
    assert mamba_cost.cp_comm(Context(short, replace(lay, cp=1))) == 0.0
    # the ring's K/V traffic does grow with it
    assert attention_cost.cp_comm(Context(long, lay)) > 3.5 * attention_cost.cp_comm(Context(short, lay))


def test_cp_comm_pin_reads_from_the_dsl_and_is_checked():
    text = ('model "m" { vocab = 256, hidden = 64, attention { heads = 4, kv_heads = 2, head_dim = 16, rope = none }'
            ' mlp { ffn = 128 } layers = 2 * [attention, mlp] }\n'
            'device "d" { bf16 = 100 TFLOP/s, memory = 80 GiB, hbm = 2 TB/s }\n'
            'cluster "c" { nodes = 1, gpus_per_node = 8, device = "d", intra = 400 GB/s, inter = 50 GB/s }\n'
            'train "t" { model = "m", cluster = "c", global_batch = 8, seq_len = 4096, '
            'layout { cp = 8, cp_comm = alltoall } }\n')
    train = parse_text(text).jobs["t"]
    assert train.layout.get("cp_comm") == "alltoall"
    with pytest.raises(LayoutError, match=r"4 % 8 = 4"):
        check_pins(train, job_pins(train))
    with pytest.raises(SpecError, match="cp_comm"):
        parse_text(text.replace("cp_comm = alltoall", "cp_comm = sideways"))
