"""The step-time band (planner/cost/uncertainty.py): it holds the point prediction, a measured value
narrows it, its deltas are the plan's own step times at each key's range ends, and the keys it
names first are the ones the layout's physics says dominate."""
from pathlib import Path

import pytest

from plait.ir.dsl import load_job
from plait.planner import calibration
from plait.planner.cost import uncertainty
from plait.kinds.moe import cost as moe_cost
from plait.planner.cost.context import Calibration
from plait.planner.search import estimate

SPECS = Path(__file__).resolve().parents[2] / "specs"
TINY = SPECS / "jobs" / "tiny-local.plait"
TINY_PINS = {"tp": 2, "pp": 2, "cp": 1, "mbs": 1, "vpp": 1, "recompute": "none"}


@pytest.fixture(scope="module")
def tiny():
    job = load_job(TINY)
    return job, estimate(job, TINY_PINS)


def test_band_holds_the_point_prediction(tiny):
    job, plan = tiny
    band = uncertainty.band(job, plan)
    assert band.step == pytest.approx(plan.prediction.step_time, rel=1e-12)
    assert band.low < band.step < band.high
    assert band.outer_low <= band.low and band.outer_high >= band.high
    assert all(k.fast <= 0 <= k.slow and k.swing > 0 for k in band.keys)
    assert all(k.origin == "default" for k in band.keys if k.key.endswith("_eff"))


def test_deltas_are_the_plans_step_at_the_range_ends(tiny):
    job, plan = tiny
    band = uncertainty.band(job, plan)
    base = {"a2a_inter_eff": Calibration.of(job.cluster.device).a2a_eff}
    for k in band.keys:
        ends = [uncertainty.step_time(job, plan, {**base, k.key: v}) - band.step
                for v in (k.low, k.high)]
        assert k.slow == pytest.approx(max(0.0, *ends)) and k.fast == pytest.approx(min(0.0, *ends))


def test_a_measured_key_narrows_the_band(tiny, tmp_path):
    """The same plan with a calibration file that measured gemm_eff and gemm_knee at exactly
    the defaults: the same step, the two keys at +-5% instead of their plausible ranges."""
    job, plan = tiny
    measured = {"gemm_eff": Calibration.gemm_eff, "gemm_knee": Calibration.gemm_knee}
    path = tmp_path / "calib.json"
    calibration.write(path, "local-cpu", "cpu", measured, {}, {})
    cal = calibration.read(path)
    before = uncertainty.band(job, plan)
    after = uncertainty.band(calibration.apply(job, cal), plan, calibration.measured_keys(cal))
    assert after.step == pytest.approx(before.step, rel=1e-12)
    assert after.high - after.low < before.high - before.low
    swing = {b: {k.key: k for k in band.keys} for b, band in (("before", before), ("after", after))}
    for key in measured:
        assert swing["after"][key].origin == "measured"
        assert swing["after"][key].swing < swing["before"][key].swing
        assert swing["after"][key].high == pytest.approx(measured[key] * 1.05)
    assert after.unmeasured() == before.unmeasured() - 2
    assert "gemm_eff" not in after.line().split("measures")[-1]


def test_fsdp_across_nodes_is_dominated_by_its_network_keys():
    """Mixtral-8x22B fully sharded over 16 nodes (the published pure-FSDP row): every step
    gathers the whole model over the NICs, so fsdp_eff and inter_eff move it most, not the
    GEMM rates; the spec's fitted inter_eff gets one grid step either side, the unset fsdp_eff
    its whole plausible range."""
    job = load_job(SPECS / "jobs" / "mixtral-8x22b-128gpu.plait")
    plan = estimate(job, {"tp": 1, "cp": 1, "pp": 1, "etp": 1, "ep": 1, "dp_kind": "fsdp"})
    band = uncertainty.band(job, plan)
    assert set(band.top(2)) == {"fsdp_eff", "inter_eff"}
    keys = {k.key: k for k in band.keys}
    grid = sorted(uncertainty.GRID["inter_eff"])
    spec = dict(job.cluster.device.calibration)["inter_eff"]
    i = grid.index(spec)
    assert keys["inter_eff"].origin == "spec" and (keys["inter_eff"].low, keys["inter_eff"].high) \
        == (grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)])
    fsdp = keys["fsdp_eff"]
    assert fsdp.origin == "default" and (fsdp.low, fsdp.high) == (0.4, 1.0)
    assert "moe_imbalance" not in keys  # capacity factor 1.0: no expert holds more than its share
    assert "inter_eff" in band.line().split("measures")[-1]  # `plait calibrate` measures it...
    assert "fsdp_eff" not in band.line().split("measures")[-1]  # ...not fsdp_eff


def test_dropless_routing_ranges_from_balanced_random_to_a_trained_router():
    job = load_job(SPECS / "jobs" / "tiny-moe-local.plait")
    plan = estimate(job, {"tp": 1, "pp": 1, "cp": 1, "ep": 4, "etp": 1, "mbs": 1, "vpp": 1})
    keys = {k.key: k for k in uncertainty.band(job, plan).keys}
    imbalance = keys["moe_imbalance"]
    assert imbalance.origin == "default" and imbalance.low == 0.0  # 0: balanced random routing
    assert imbalance.high >= moe_cost.TRAINED_ROUTER and imbalance.slow > 0


def test_every_range_holds_its_value_and_stays_physical():
    """A default lies inside its plausible range; a spec or measured value inside its own; only
    the knee, the imbalance and the all-to-all ratios may pass 1."""
    own = {"moe_imbalance": (0.0, moe_cost.TRAINED_ROUTER, "a kind's own range")}
    for key in (*uncertainty.KEYS, *own):
        default = getattr(Calibration(), key)
        low, high, _ = uncertainty.key_range(key, default, "default", own)
        assert low <= (default or low) <= high, key  # moe_imbalance 0: balanced routing
        for value in (0.64, 1.0, 1.75):
            for where in ("spec", "measured"):
                low, high, _ = uncertainty.key_range(key, value, where, own)
                assert low <= value <= high, (key, where, value)
                assert high <= 1.0 or key in uncertainty.UNBOUNDED or value > 1.0, key
    low, high, _ = uncertainty.key_range("fsdp_eff", 0.72, "spec", own)
    assert (low, high) == (0.68, 0.76)  # the grid's neighbours
