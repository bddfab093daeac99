"""The search's bounds are bounds: against an exhaustive solve of every legal layout of a small
dense job, the search's winner is the best plan, and each mesh's floor lies below all its plans.

The job is Korthikanti et al.'s GPT 22B on 8 A100 (benchmarks/search_speed.py's first row). Its best
mesh (tp2 cp2) screens more than 10 % worse than an early one (tp4 cp2), so a search that drops
meshes by how their estimate compares (the old SCREEN_SLACK) returns the wrong winner here."""
import dataclasses
from pathlib import Path

import pytest

from plait.ir.dsl import load_file, load_model
from plait.ir.job import Precision, TrainJob
from plait.planner.bounds import costed, floor_kinds, make_candidate, mesh_floor
from plait.planner.layouts import job_pins, knob_variants, meshes, units
from plait.planner.partition import solve
from plait.planner.search import DEFAULT_KINDS, make_plan, search

SPECS = Path(__file__).resolve().parents[2] / "specs"
OPTIONS = (0, 1, 2)


@pytest.fixture(scope="module")
def gpt22b():
    cluster = load_file(SPECS / "clusters" / "dgx-a100.plait").clusters["dgx-a100"]
    return TrainJob(name="gpt-22b-8gpu", model=load_model(SPECS / "models" / "gpt-22b.plait"),
                    cluster=dataclasses.replace(cluster, nodes=1), global_batch=4, seq_len=2048,
                    precision=Precision(kind="bf16"))


def exhaustive(job):
    """mesh -> (its variants, the best solved step time of each variant), no bound consulted."""
    pins, unit_kinds, out = job_pins(job, None), units(job.model), {}
    for mesh in meshes(job, pins):
        variants = [v for v in knob_variants(job, mesh, pins) if v.dp_kind in DEFAULT_KINDS]
        steps = {}
        for lay in variants:
            cand = make_candidate(lay, costed(job, lay, OPTIONS, unit_kinds))
            part = solve(cand.problem)
            if part is not None:
                steps[lay] = make_plan(cand.table, part.sizes, part.options).prediction.step_time
        out[mesh] = (variants, steps)
    return out


@pytest.fixture(scope="module")
def every_plan(gpt22b):
    return exhaustive(gpt22b)


def test_search_winner_is_the_exhaustive_best(gpt22b, every_plan):
    best = min(s for _, steps in every_plan.values() for s in steps.values())
    winner = search(gpt22b).best
    assert winner.prediction.step_time <= best * (1 + 1e-9), (
        f"search chose {winner.layout.short()} at {winner.prediction.step_time:.4f} s, "
        f"but a legal plan steps in {best:.4f} s")


def test_mesh_floor_is_below_every_plan_of_its_mesh(gpt22b, every_plan):
    unit_kinds = units(gpt22b.model)
    checked = 0
    for mesh, (variants, steps) in every_plan.items():
        if not steps:
            continue
        tables = {}
        for v in variants:
            for kind in floor_kinds(DEFAULT_KINDS):
                tables[(v.mbs, kind)] = costed(gpt22b, dataclasses.replace(v, dp_kind=kind),
                                               OPTIONS, unit_kinds)
        floor = mesh_floor(tables, variants, DEFAULT_KINDS)
        assert floor <= min(steps.values()) * (1 + 1e-9), mesh.short()
        checked += 1
    assert checked >= 5
