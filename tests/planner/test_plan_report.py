"""`plait plan JOB --report DIR`: the files are written and the numbers drawn are the plan's."""
import json
from pathlib import Path

import pytest

from plait.cli import main
from plait.ir.dsl import load_job
from plait.ir.plan import ParallelPlan
from plait.planner.cost.evaluate import rank_cost
from plait.planner.cost.pipeline import CostTable
from plait.planner.groups import groups_over
from plait.planner.layouts import units
from plait.report import MEMORY_TERMS, schedule_order

pytest.importorskip("matplotlib")
JOB = Path(__file__).resolve().parents[2] / "specs" / "jobs" / "tiny-local.plait"
GiB = float(2**30)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "r"
    assert main(["plan", str(JOB), "--layout", "tp=2 pp=2 dp=2", "--report", str(out)]) == 0
    plan = ParallelPlan.from_json((out / "plan.json").read_text())
    return out, plan, json.loads((out / "report.json").read_text())


def test_files_are_written(report):
    out, _, _ = report
    for name in ("schedule", "memory", "candidates", "ranks"):
        for ext in ("svg", "png"):
            assert (out / f"{name}.{ext}").stat().st_size > 1000
    page = (out / "index.html").read_text()
    assert all(f'src="{n}.svg"' in page for n in ("schedule", "memory", "candidates", "ranks"))


def test_numbers_are_the_plans(report):
    out, plan, numbers = report
    assert numbers["layout"] == plan.layout.short()
    for drawn, m in zip(numbers["memory_gib"], plan.prediction.memory):
        for term in MEMORY_TERMS:
            assert drawn[term] == pytest.approx(getattr(m, term) / GiB)
    chosen = [c for c in numbers["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["mfu"] == pytest.approx(plan.prediction.mfu)
    assert chosen[0]["peak_gib"] == pytest.approx(plan.prediction.peak_memory / GiB)
    assert numbers["schedule"]["micro_batches"] == plan.num_microbatches
    page = (out / "index.html").read_text()
    assert f"{plan.prediction.step_time:.3f} s" in page and plan.optimality.line() in page


def test_schedule_runs_every_micro_batch_and_keeps_each_rank_busy_its_time(report):
    _, plan, numbers = report
    job = load_job(JOB)
    table = CostTable(job, plan.layout, units(job.model))
    m, pp = plan.num_microbatches, plan.layout.pp
    for r in range(pp):
        mine = [t for t in numbers["tasks"] if t["rank"] == r]
        assert len(mine) == 2 * m * plan.layout.vpp
        busy = sum(s for t in mine for _, s in t["parts"])
        # the rank's per-micro-batch time from the cost model, m times
        assert busy == pytest.approx(m * rank_cost(table, plan.stages, r).time, rel=1e-9)
        assert numbers["schedule"]["rank_seconds_per_step"][r] == pytest.approx(busy)
    assert numbers["schedule"]["makespan"] >= max(numbers["schedule"]["rank_seconds_per_step"])


def test_rank_grid_follows_the_groups(report):
    _, plan, numbers = report
    ranks = numbers["grid"]["ranks"]
    for dim in ("tp", "dp", "pp"):
        for group in groups_over(plan.layout, "dense", (dim,)):
            assert [ranks[r][dim] for r in group] == list(range(len(group)))


def test_interleaved_order_has_every_task_once():
    order = schedule_order(4, 2, 8, 1)
    assert sorted(order) == sorted({(k, v, i) for k in ("forward", "backward")
                                    for v in range(2) for i in range(8)})


def test_refuses_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    assert main(["plan", str(JOB), "--layout", "tp=2 pp=2 dp=2", "--report", str(tmp_path)]) != 0
    assert (tmp_path / "mine.txt").read_text() == "user data"
