"""The cost model charges what the runtime runs under each precision (ir/precision.py): fp8 only
for the linears of the layers between the bf16 ends; expert GEMMs, the router and the LM head at
bf16; `plan --explain` shows each stage's precision."""
from dataclasses import replace

import pytest

from plait.commands.plan import precision_table
from plait.ir.job import Precision
from plait.ir.plan import Layout, ParallelPlan, even_stages
from plait.kinds.attention import cost as attention_cost
from plait.kinds.moe import cost as moe_cost
from plait.planner.cost import compute
from plait.planner.cost.context import Context
from plait.planner.cost.pipeline import CostTable
from plait.planner.layouts import units

from conftest import dgx, H100, job, mixtral_8x22b, nemotron_h_8b

LAYOUT = Layout(tp=2, pp=2, dp=2, mbs=1)


def _job(model, precision):
    return replace(job(model, dgx(H100, 1, 450e9, 50e9), global_batch=64), precision=precision)


def _units(j):
    return CostTable(j, LAYOUT, units(j.model)).units


def test_fp8_ends_cost_bf16_and_the_middle_fp8():
    model = nemotron_h_8b()
    bf16 = _units(_job(model, Precision("bf16")))
    fp8 = _units(_job(model, Precision("fp8", "tensorwise", 4, 4)))
    n = len(fp8)
    ends = [i for i in range(n) if i < 4 or i >= n - 4]
    for i in range(n):
        if i in ends:
            assert fp8[i].fwd == pytest.approx(bf16[i].fwd), i  # the bf16 ends: bf16 GEMMs
        else:
            assert fp8[i].fwd < bf16[i].fwd, i  # twice the GEMM peak in the middle
    no_ends = _units(_job(model, Precision("fp8", "tensorwise", 0, 0)))
    assert sum(u.fwd for u in no_ends) < sum(u.fwd for u in fp8)


def test_expert_gemms_router_and_head_stay_bf16_under_fp8():
    model = mixtral_8x22b()
    ctx8 = Context(_job(model, Precision("fp8", "tensorwise", 0, 0)), LAYOUT)
    ctx16 = Context(_job(model, Precision("bf16")), LAYOUT)
    assert compute.head_work(ctx8).gemm == pytest.approx(compute.head_work(ctx16).gemm)
    moe8, moe16 = moe_cost.work(ctx8), moe_cost.work(ctx16)
    attn8, attn16 = attention_cost.work(ctx8), attention_cost.work(ctx16)
    assert moe8.gemm == pytest.approx(moe16.gemm)  # grouped GEMMs and router: bf16
    assert attn8.gemm < attn16.gemm  # q, k, v, o projections: fp8


def test_explain_shows_each_stage_precision():
    model = nemotron_h_8b()
    j = _job(model, Precision("fp8", "tensorwise", 2, 3))
    stages = even_stages(model.num_layers, 2, 1)
    plan = ParallelPlan(job="t", model=model.name, cluster="c", world=8, layout=LAYOUT,
                        stages=stages, global_batch=64, seq_len=4096)
    rows = [[c._cells[i] for c in precision_table(j, plan).columns] for i in range(2)]
    last = model.num_layers - 1
    assert rows[0] == ["pp0", f"0-{stages[0].last - 1}", "fp8 (bf16 GEMMs: layers 0-1)"]
    assert rows[1] == ["pp1", f"{stages[1].first}-{last}", f"fp8 (bf16 GEMMs: layers {last - 2}-{last})"]
    assert "fp32 main weights" in precision_table(j, plan).title


def test_fp8_job_plans_where_fp8_is_no_faster():
    """local-cpu has no fp8 peak: bf16-end units cost the same as fp8 ones and the partitioners
    still see one unit type per distinct cost (it used to fail looking a unit up by identity)."""
    from pathlib import Path

    from plait.ir.dsl import load_job
    from plait.planner.search import search

    jobs = Path(__file__).resolve().parents[2] / "specs" / "jobs"
    j = replace(load_job(jobs / "tiny-local.plait"), precision=Precision("fp8", "tensorwise", 1, 1))
    res = search(j, {"tp": 2, "pp": 2}, top=1)
    assert res.best is not None and res.best.layout.pp == 2
