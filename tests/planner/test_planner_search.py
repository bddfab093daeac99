"""The search: legal, sorted, deterministic plans; pins; infeasible jobs explained."""
from pathlib import Path

import pytest

from plait.ir.dsl import load_job
from plait.ir.errors import LayoutError
from plait.ir.plan import ParallelPlan
from plait.planner.layouts import validate_layout
from plait.planner.search import estimate, search

SPECS = Path(__file__).resolve().parents[2] / "specs"


@pytest.fixture(scope="module")
def tiny_result():
    job = load_job(SPECS / "jobs" / "tiny-local.plait")
    return job, search(job, top=4)


def test_plans_are_legal_sorted_and_cover_the_model(tiny_result):
    job, res = tiny_result
    assert res.plans and res.enumerated >= len(res.plans)
    # every winner's partition is proven optimal: by a solver, or by an even split that meets the
    # lower bound on z (then no solver runs, and res.solved may be 0)
    assert all(p.optimality.proven for p in res.plans)
    steps = [p.prediction.step_time for p in res.plans]
    assert steps == sorted(steps)
    for plan in res.plans:
        validate_layout(job, plan.layout)
        layers = sorted((s.first, s.last) for s in plan.stages)
        assert layers[0][0] == 0 and layers[-1][1] == job.model.num_layers
        assert all(a[1] == b[0] for a, b in zip(layers, layers[1:]))
        assert len(plan.stages) == plan.layout.pp * plan.layout.vpp
        assert plan.prediction.peak_memory <= job.cluster.device.memory
    assert res.plans[0].explanation and "MFU" in res.plans[0].explanation[0]


def test_plan_json_round_trip(tiny_result):
    _, res = tiny_result
    plan = res.plans[0]
    assert ParallelPlan.from_json(plan.to_json()) == plan


def test_search_is_deterministic(tiny_result):
    job, res = tiny_result
    again = search(job, top=4)
    assert [p.to_json() for p in again.plans] == [p.to_json() for p in res.plans]


def test_estimate_keeps_the_pins(mixtral_job):
    plan = estimate(mixtral_job(), {"tp": 2, "pp": 8, "ep": 8, "etp": 1, "cp": 1, "vpp": 1,
                                    "mbs": 1})
    lay = plan.layout
    assert (lay.tp, lay.pp, lay.ep, lay.etp, lay.dp, lay.edp) == (2, 8, 8, 1, 8, 2)
    assert plan.moe is not None and plan.layer_pattern.startswith("*E")


def test_impossible_pin_is_an_error_with_arithmetic(mixtral_job):
    with pytest.raises(LayoutError, match=r"experts \(8\) must be divisible by ep \(16\)"):
        estimate(mixtral_job(), {"ep": 16})
    with pytest.raises(LayoutError, match=r"ep = 3 does not divide the 128 GPUs"):
        estimate(mixtral_job(), {"ep": 3})


def test_no_feasible_layout_names_the_smallest_need(llama_job):
    job = llama_job(gpus=8)
    with pytest.raises(LayoutError) as err:
        estimate(job, {})
    text = err.value.format()
    assert "smallest need found" in text and "GiB" in text and "more GPUs" in text
