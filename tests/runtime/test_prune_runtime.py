"""Tier 2: a pruned model runs in the compiled runtime. tiny-hybrid pruned in every way its spec
allows (hidden, ffn, attention heads, group-aware mamba heads and head_dim, a mamba layer dropped
so the hybrid pattern changes) under a layout pin tp = 2, then trained under TP 2 and DP 2: loss and
gradients equal one device's."""
import pytest

from plait.ir import counts
from plait.ir.dsl import load_model
from plait.ir.job import AxisSearch, LayoutPins, PruneJob, PruneTarget
from plait.ir.plan import Layout
from plait.planner.prune.plan import plan_prune
from plait.planner.prune.scores import random_scores
from plait.runtime.harness.parity import Case, Setup, run_parity

HYBRID = load_model("specs/models/tiny-hybrid.plait")
WIDTHS = {"hidden": 112, "ffn": 128, "mamba_heads": 4, "mamba_head_dim": 16, "attention_heads": 2}
FULL_DEPTH = plan_prune(PruneJob(name="w", model=HYBRID, axes=tuple(AxisSearch(a, "fixed", value=v)
                                                                      for a, v in WIDTHS.items()))).plan.chosen
JOB = PruneJob(name="tiny-hybrid-pruned", model=HYBRID, layout=LayoutPins((("tp", 2),)),
               target=PruneTarget(params=FULL_DEPTH.params - 1), depth=("mamba",),  # one mamba layer must go
               axes=tuple(AxisSearch(a, "fixed", value=v) for a, v in WIDTHS.items()))
PRUNED = plan_prune(JOB, random_scores(HYBRID, 2), top=1).plan.model
CASES = [Case("tp2", Layout(tp=2, dp_kind="replicated")), Case("dp2", Layout(dp=2))]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_parity(Setup(PRUNED, global_batch=4, seq=32, steps=1), CASES, str(tmp_path_factory.mktemp("pruned")))


def test_the_pruned_spec_is_really_pruned():
    assert PRUNED.mamba.heads == 4 and PRUNED.mamba.head_dim == 16 and PRUNED.attention.heads == 2
    assert PRUNED.count("mamba") == HYBRID.count("mamba") - 1 and counts.params(PRUNED).total <= JOB.target.params


@pytest.mark.tier2
@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_pruned_model_trains_in_the_runtime(results, name):
    errors = results[name]
    assert errors.loss < 1e-5 and errors.grads < 1e-5, errors
