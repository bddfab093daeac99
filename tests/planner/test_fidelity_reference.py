"""Fidelity regression on the published rows of shared/reference (benchmarks/fidelity.py): the
shipped device calibrations predict SC'21 Table 1 (dense GPT, A100) and MoE Parallel Folding
Table 3 (Mixtral-8x22B, Qwen2-57B-A14B, H100) within the bounds the benchmark reports today, and
order each MoE model's methods as published. A change to the cost model that loses fidelity
fails here; the cross-validated columns are the benchmark's, not a test's (they take minutes)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import fidelity  # noqa: E402

# (mean, max) |relative error| bounds, a little above today's 2.2% / 4.5% and 6.9% / 19.6%. The
# MoE max is Mixtral's pure-FSDP row (+19.6%; Qwen2's is -13%): the two models' pure-FSDP rows
# disagree by 1.33x per byte moved, and the H100 calibration fits only the table's communication
# keys (benchmarks/calibrate.py MOE_FITTED), not its compute rates: fitting all nine keys kept
# this max at 16.6% but predicted the other model's Megatron-Core rows 8.9% mean off against
# 5.0% (leave-one-model-out, benchmarks/fidelity.py)
BOUNDS = {"sc21": (0.03, 0.05), "folding": (0.07, 0.20)}


@pytest.fixture(scope="module")
def results():
    return fidelity.run_rows(fidelity.sc21_rows() + fidelity.folding_rows())


@pytest.mark.parametrize("table", sorted(BOUNDS))
def test_published_rows_within_bounds(results, table):
    mine = [x for x in results if x[0].table == table]
    assert len(mine) == 10 and all(lay is not None for *_, lay in mine)
    mean, worst = fidelity.summarize(mine)
    bound_mean, bound_max = BOUNDS[table]
    assert mean <= bound_mean and worst <= bound_max, f"{table}: mean {mean:.1%} max {worst:.1%}"


def test_method_order_as_published(results):
    for group, (ok, published, predicted) in fidelity.order_ok(results).items():
        assert ok, f"{group}: published {published}, predicted {predicted}"
