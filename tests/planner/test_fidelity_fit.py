"""The calibration fitter of benchmarks/calibrate.py (what benchmarks/fidelity.py's cross-validated
columns rest on): properties of the fit, not its error figures. It finds the grid's optimum from
any start and twice alike, keeps a key the rows do not exercise at its default, never reads the
held-out rows while fitting, and carries across devices only what is not one device's rate."""
import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import calibrate  # noqa: E402
import fidelity  # noqa: E402

PARAMS = ("gemm_eff", "fsdp_eff")  # fsdp_eff: the SC'21 rows replicate, no FSDP gather runs


@pytest.fixture(scope="module")
def dense():
    rows = fidelity.sc21_rows()
    return rows[:2], rows[8:9]  # train: 1.7B and 3.6B on one node; held out: 529.6B, pp35


@pytest.fixture(scope="module")
def fit(dense):
    train, _ = dense
    return calibrate.fit_rows(train, fidelity.run_rows, fidelity.summarize,
                              calibrate.stack_facts(train), PARAMS, log=lambda *a: None)


def test_fit_is_deterministic(dense, fit):
    train, _ = dense
    again = calibrate.fit_rows(train, fidelity.run_rows, fidelity.summarize,
                               calibrate.stack_facts(train), PARAMS, log=lambda *a: None)
    assert again == fit


def test_fit_finds_the_grid_optimum_and_stays_within_tolerance(dense, fit):
    train, _ = dense
    first = fidelity.run_rows(train, calibrate.stack_facts(train))
    frozen = [fidelity.dataclasses.replace(r, pins=calibrate.frozen_pins(r, lay))
              for r, _, lay in first]
    every = [calibrate.objective(fidelity.run_rows(frozen, {**calibrate.stack_facts(train),
                                                             "gemm_eff": g, "fsdp_eff": f}),
                                 fidelity.summarize)
             for g, f in itertools.product(calibrate.GRID["gemm_eff"], calibrate.GRID["fsdp_eff"])]
    assert fit.best == pytest.approx(min(every))
    assert fit.score <= fit.best + calibrate.TOL


def test_a_key_the_rows_do_not_exercise_keeps_its_default(fit):
    assert fit.values["fsdp_eff"] == calibrate.DEFAULTS.fsdp_eff
    assert "fsdp_eff" not in fit.identified()
    # every value of it fits as well: the near-optimal set spans its whole grid
    assert fit.spread("fsdp_eff") == (min(calibrate.GRID["fsdp_eff"]),
                                      max(calibrate.GRID["fsdp_eff"]))


def test_held_out_rows_are_never_read_while_fitting(dense, monkeypatch):
    train, test = dense
    calls = []
    real = fidelity.run_rows

    def recorded(rows, calibration=None):
        calls.append({r.label for r in rows})
        return real(rows, calibration)

    monkeypatch.setattr(fidelity, "run_rows", recorded)
    out = fidelity.held_out(train, test, log=lambda *a: None)
    held = {r.label for r in test}
    first_test = next(i for i, labels in enumerate(calls) if labels & held)
    assert not any(labels & held for labels in calls[:first_test])
    assert all(labels <= held for labels in calls[first_test:])  # the fit is over by then
    assert [r.label for r, _, _ in out.results] == [r.label for r in test]


def test_a_transfer_across_devices_carries_no_device_rate():
    sc21, folding = fidelity.sc21_rows()[:1], fidelity.folding_rows()[:1]
    across = calibrate.transferable(folding, sc21)
    assert not set(across) & set(calibrate.DEVICE)
    assert not set(across) & set(calibrate.SCHEDULE)  # the two stacks differ (flash attention)
    assert set(calibrate.DEVICE) <= set(calibrate.transferable(folding, folding))
    moved = calibrate.transfer({"gemm_eff": 0.6, "hbm_eff": 0.9}, ("hbm_eff",), sc21)
    assert moved == {**calibrate.stack_facts(sc21), "hbm_eff": 0.9}
