"""Folded vs unfolded MoE layouts: the definition (Megatron-Core before MoE Parallel Folding: ETP = TP,
EP inside DP), and the planner's explanation of what folding gains on the paper's two jobs."""
import itertools
import re
from pathlib import Path

import pytest

from plait.cli import main
from plait.ir.dsl import load_job
from plait.ir.plan import Layout
from plait.planner.folding import ep_inside_dp, ep_spans, is_unfolded, what_folds
from plait.planner.groups import groups_over
from plait.planner.layouts import validate_layout
from plait.planner.search import search

SPECS = Path(__file__).resolve().parents[2] / "specs"
JOBS = {"mixtral": "mixtral-8x22b-128gpu", "qwen2": "qwen2-57b-a14b-64gpu"}
# the paper's Table 3 "MCore" (pre-folding) rows: (tp, ep, pp, etp), cp 1
MCORE = {"mixtral": (2, 4, 8, 2), "qwen2": (2, 4, 4, 2)}


@pytest.mark.parametrize("layout, unfolded", [
    (Layout(tp=2, dp=8, pp=8, etp=2, ep=4, edp=2), True),  # Mixtral "MCore": EP4 strides DP8
    (Layout(tp=2, dp=8, pp=8, etp=1, ep=8, edp=2), False),  # the paper's folding: ETP != TP
    (Layout(tp=1, cp=2, dp=8, pp=8, etp=1, ep=8, edp=2), False),  # CP folded into EP
    (Layout(tp=2, dp=2, pp=2, etp=2, ep=4, edp=1), False),  # EP4 > DP2
    (Layout(tp=4, cp=2, dp=4, pp=1, etp=4, ep=1, edp=8), True),  # no EP: experts like dense
    (Layout(tp=1, dp=8, etp=1, ep=8, edp=1), True),  # EP = DP
])
def test_unfolded_is_etp_equal_tp_and_ep_inside_dp(layout, unfolded):
    assert is_unfolded(layout) is unfolded
    assert (what_folds(layout) == []) is unfolded


def _ep_inside_dp_by_groups(lay: Layout) -> bool:
    """The definition, on the built groups: every EP group inside one dense DP group."""
    dp_of = {r: i for i, g in enumerate(groups_over(lay, "dense", ("dp",))) for r in g}
    return all(len({dp_of[r] for r in g}) == 1 for g in groups_over(lay, "expert", ("ep",)))


def _small_layouts(world: int):
    divs = [d for d in range(1, world + 1) if world % d == 0]
    for tp, cp, pp in itertools.product(divs, repeat=3):
        if world % (tp * cp * pp):
            continue
        dp = world // (tp * cp * pp)
        inner = tp * cp * dp
        for etp, ep in itertools.product(divs, repeat=2):
            if inner % (etp * ep) == 0:
                yield dict(tp=tp, cp=cp, dp=dp, pp=pp, etp=etp, ep=ep, edp=inner // (etp * ep))


ORDERS = list(itertools.permutations(("tp", "cp", "ep", "dp", "pp")))


@pytest.mark.parametrize("world, orders", [(4, ORDERS), (6, ORDERS), (8, ORDERS),
                                           (12, ORDERS[::12]), (16, ORDERS[::12])])
def test_ep_inside_dp_arithmetic_equals_the_groups(world, orders):
    """Every layout of a small world under every rank order (every 12th on the larger worlds):
    the stride arithmetic decides "EP inside DP" exactly as the built groups do."""
    seen = set()
    for sizes in _small_layouts(world):
        for order in orders:
            lay = Layout(**sizes, order="-".join(order))
            expect = _ep_inside_dp_by_groups(lay)
            assert ep_inside_dp(lay) is expect, lay
            seen.add(expect)
    assert seen == {True, False}


def test_what_folds_names_the_spanned_dimensions():
    lay = Layout(tp=1, cp=2, dp=8, pp=8, etp=1, ep=8, edp=2)
    assert ep_spans(lay) == {"cp": 2, "dp": 4}
    assert what_folds(lay) == ["its EP8 group spans CP2 x DP4 of the attention layout (EP inside "
                               "DP would stride over DP8 ranks only)"]
    assert what_folds(Layout(tp=2, dp=8, etp=1, ep=8, edp=2))[0] == \
        "experts run ETP1 beside attention TP2"


@pytest.fixture(scope="module")
def searched():
    out = {}
    for key, name in JOBS.items():
        job = load_job(SPECS / "jobs" / f"{name}.plait")
        out[key] = (job, search(job))
    return out


@pytest.mark.parametrize("key", list(JOBS))
def test_winner_is_folded_and_explains_the_gain_over_the_best_unfolded(searched, key):
    job, res = searched[key]
    win, alt = res.best, res.unfolded
    assert not is_unfolded(win.layout) and alt is not None and is_unfolded(alt.layout)
    validate_layout(job, alt.layout)
    assert alt.prediction.peak_memory <= job.cluster.device.memory
    assert alt.prediction.step_time > win.prediction.step_time
    gain = (alt.prediction.step_time / win.prediction.step_time - 1) * 100
    assert res.folding in win.explanation
    assert res.folding.startswith(f"folding gains {gain:.1f}% over the best unfolded layout")
    assert alt.layout.short() in res.folding and "because " in res.folding
    for reason in what_folds(win.layout):
        assert reason in res.folding


@pytest.mark.parametrize("key", list(JOBS))
def test_best_unfolded_is_no_worse_than_the_papers_mcore_layout(searched, key):
    job, res = searched[key]
    tp, ep, pp, etp = MCORE[key]
    pins = {"tp": tp, "ep": ep, "pp": pp, "etp": etp, "cp": 1}
    mcore = search(job, pins, top=1, max_solves=2, compare_unfolded=False).best
    assert is_unfolded(mcore.layout)
    assert res.unfolded.prediction.step_time <= mcore.prediction.step_time * (1 + 1e-9)


def test_no_rejected_family_claims_to_be_faster_than_the_winner(searched):
    for job, res in searched.values():
        for rej in res.rejections:
            assert not re.match(r"-\d", rej.reason), rej
        beats = [line for line in res.best.explanation if line.startswith("beats the best")]
        assert beats and re.search(r"it is \+\d", beats[0]), beats


def test_an_unfolded_winner_says_so(mixtral_job):
    pins = {"tp": 2, "etp": 2, "ep": 4, "cp": 1, "pp": 8, "mbs": 1, "vpp": 1}
    res = search(mixtral_job(), pins, top=1, max_solves=1)
    assert is_unfolded(res.best.layout) and res.unfolded is None
    assert res.folding.startswith("the winner is unfolded") and res.folding in res.best.explanation


def test_dense_models_have_no_folding_line():
    res = search(load_job(SPECS / "jobs" / "tiny-local.plait"), top=1, max_solves=1)
    assert res.folding is None and res.unfolded is None


def test_plan_explain_prints_the_unfolded_alternative(capsys):
    assert main(["plan", str(SPECS / "jobs" / f"{JOBS['qwen2']}.plait"), "--explain",
                 "--top", "2"]) == 0
    text = capsys.readouterr().out
    assert "folded winner vs best unfolded layout (ETP = TP, EP inside DP)" in text
    assert text.count("folding gains") == 2  # in the winner's reasons and under the table


def test_pins_that_forbid_unfolding_are_named(mixtral_job):
    pins = {"tp": 2, "etp": 1, "ep": 8, "cp": 1, "pp": 8, "mbs": 1, "vpp": 1}
    res = search(mixtral_job(), pins, top=1, max_solves=1)
    assert res.unfolded is None
    assert res.folding.startswith("the rules and pinned dimensions leave no unfolded layout")
