"""Runnable-only search: the planner ranks every legal plan, offers only those plait's runtime can
execute, and names the better ones it cannot run with the RUNNABLE row that stops each."""
from pathlib import Path

import pytest

from plait.cli import main
from plait.ir import legality
from plait.ir.dsl import load_job
from plait.ir.errors import LayoutError
from plait.planner.layouts import parse_layout
from plait.planner.search import estimate, search

SPECS = Path(__file__).resolve().parents[2] / "specs"
MOE = str(SPECS / "jobs" / "tiny-moe-local.plait")
FSDP_FOLDED = "cp=2 ep=2 dp_shard=fsdp"  # the best legal plans fold experts over CP under FSDP


@pytest.fixture(scope="module")
def moe_job():
    return load_job(MOE)


@pytest.fixture(scope="module")
def results(moe_job):
    pins = parse_layout(FSDP_FOLDED)
    return (search(moe_job, pins, top=3), search(moe_job, pins, top=3, runnable_only=True))


def runnable_violations(job, layout):
    t = legality.table(legality.Workload.of_job(job))
    return t.violations(layout, t.select((legality.RUNNABLE,)))


def test_runnable_only_offers_only_plans_plait_can_run(moe_job, results):
    legal, runnable = results
    assert runnable_violations(moe_job, legal.best.layout)  # the legal winner is blocked
    assert runnable.plans and all(not runnable_violations(moe_job, p.layout)
                                  for p in runnable.plans)
    assert runnable.best.prediction.step_time > legal.best.prediction.step_time


def test_the_better_blocked_plans_are_named_with_their_rule(moe_job, results):
    legal, runnable = results
    best = runnable.best.prediction.step_time
    assert runnable.blocked and [b.plan.layout for b in runnable.blocked][0] == legal.best.layout
    for b in runnable.blocked:
        assert b.plan.prediction.step_time < best
        [v] = runnable_violations(moe_job, b.plan.layout)
        assert (b.rule, b.reason) == (v.rule.name, v.message) == ("moe-fsdp-experts", v.message)
    assert any(line.startswith("plait runs the best plan it can: " + legal.best.layout.short())
               for line in runnable.best.explanation)
    assert not legal.blocked  # a legal search has nothing to name


def test_when_the_legal_winner_runs_both_searches_agree():
    job = load_job(str(SPECS / "jobs" / "tiny-local.plait"))
    legal, runnable = search(job, top=3), search(job, top=3, runnable_only=True)
    assert [p.layout for p in runnable.plans] == [p.layout for p in legal.plans]
    assert runnable.blocked == []


def test_no_runnable_layout_names_the_best_legal_ones_and_their_rule(moe_job):
    with pytest.raises(LayoutError) as err:
        estimate(moe_job, parse_layout(FSDP_FOLDED + " tp=1"), runnable_only=True)
    text = err.value.message
    assert "no layout plait can run yet for job 'tiny-moe-local'" in text
    assert "plait cannot run it yet (moe-fsdp-experts): fsdp shards expert weights only when " \
           "edp = dp*cp: edp = 4, dp*cp = 4*2 = 8" in text
    assert estimate(moe_job, parse_layout(FSDP_FOLDED + " tp=1")).layout.tp == 1  # legal: fine


def test_plan_explain_lists_the_better_plans_plait_cannot_run(moe_job, results, capsys):
    legal, _ = results
    assert main(["plan", MOE, "--layout", FSDP_FOLDED, "--explain", "--top", "2"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("better plans plait cannot run yet"):]
    assert legal.best.layout.short() in table and "moe-fsdp-experts" in table
    assert "edp = dp*cp" in " ".join(table.split())
    plans = out[:out.index("why")]
    assert legal.best.layout.short() not in plans  # the recommended plans all run
    assert main(["plan", MOE, "--layout", FSDP_FOLDED, "--legal", "--top", "1"]) == 0
    assert legal.best.layout.short() in capsys.readouterr().out


def test_estimate_predicts_a_legal_layout_and_says_plait_cannot_run_it(capsys):
    assert main(["estimate", MOE, "--layout", FSDP_FOLDED + " tp=1 etp=1"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "tp1 cp2 dp4 pp1 | etp1 ep2 edp4" in out
    assert ("note: Megatron's rules allow this layout, but plait cannot run it yet: fsdp shards "
            "expert weights only when edp = dp*cp: edp = 4, dp*cp = 4*2 = 8") in out
    assert main(["estimate", MOE, "--layout", "cp=2 ep=2 dp_shard=zero1 tp=1 etp=1"]) == 0
    assert "plait cannot run it yet" not in capsys.readouterr().out
