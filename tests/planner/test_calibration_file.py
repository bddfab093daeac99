"""Calibration files (`plait calibrate -o`): write / read round trip, what applying one changes,
the errors bad files give, and how plans say they used one."""
import json
from pathlib import Path
from dataclasses import replace

import pytest

from plait.cli import main
from plait.ir.dsl import load_job
from plait.ir.errors import PlaitError
from plait.ir.plan import Layout, even_stages
from plait.planner import calibration
from plait.planner.cost.context import Calibration
from plait.planner.cost.pipeline import CostTable
from plait.planner.cost.evaluate import evaluate
from plait.planner.fingerprint import fingerprints
from plait.planner.layouts import units
from plait.planner.search import estimate


SPECS = Path(__file__).resolve().parents[2] / "specs"
JOB = SPECS / "jobs" / "tiny-local.plait"
VALUES = {"gemm_eff": 0.3, "gemm_knee": 16.0, "hbm_eff": 0.4, "intra_latency_us": 500.0,
          "kernel_us": 60.0, "shared_cores": 1.5}


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.json"
    calibration.write(path, "local-cpu", "cpu", VALUES, {"gemm_eff": "6 GEMM shapes"},
                      {"compute": {"copy": 1e9}})
    return path


def test_round_trip(calib):
    cal = calibration.read(calib)
    assert dict(cal.values) == VALUES
    assert (cal.cluster, cal.device) == ("local-cpu", "cpu")
    assert dict(cal.sources)["gemm_eff"] == "6 GEMM shapes"
    assert len(cal.digest) == 16


def test_applied_values_override_the_spec_and_change_the_prediction(calib):
    job = load_job(JOB)
    cal = calibration.read(calib)
    applied = calibration.apply(job, cal)
    got = Calibration.of(applied.cluster.device)
    assert got.gemm_eff == 0.3 and got.shared_cores == 1.5
    assert got.kv_expanded == Calibration.of(job.cluster.device).kv_expanded  # spec values stay
    lay = Layout(dp=2, mbs=2)
    stages = even_stages(job.model.num_layers, 1, 1, recompute="none")
    before = evaluate(CostTable(job, lay, units(job.model)), stages)
    after = evaluate(CostTable(applied, lay, units(job.model)), stages)
    assert after.step_time > before.step_time  # a slower GEMM, host cost, shared cores
    assert dict(fingerprints(applied))["calibration"] != dict(fingerprints(job))["calibration"]


def test_plan_names_the_measured_values_and_the_file(calib, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", str(JOB), "--calibration", str(calib), "--top", "1", "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["explanation"][0].startswith("measured by `plait calibrate`")
    assert "gemm_eff = 0.3" in doc["explanation"][0]
    prints = dict(map(tuple, doc["fingerprints"]))
    assert prints["calibration_file"] == calibration.read(calib).digest
    assert main(["estimate", str(JOB), "--layout", "dp=2", "--calibration", str(calib)]) == 0
    assert "kernel_us = 60" in capsys.readouterr().out


def test_calibrated_estimate_equals_the_evaluated_layout(calib):
    job = calibration.apply(load_job(JOB), calibration.read(calib))
    plan = estimate(job, {"dp": 8, "mbs": 2, "pp": 1, "tp": 1, "cp": 1, "recompute": "none",
                          "dp_kind": "zero1"})
    assert plan.prediction.step_time > 0


@pytest.mark.parametrize("doc, why", [
    ("not json", "invalid JSON"),
    ('{"format": "other", "values": {}}', '"format" must be'),
    ('{"format": "plait-calibration", "values": []}', '"values" must be an object'),
    ('{"format": "plait-calibration", "values": {"gemm": 0.5}}', "unknown key 'gemm'"),
    ('{"format": "plait-calibration", "values": {"gemm_eff": "0.5"}}', "finite number"),
    ('{"format": "plait-calibration", "values": {"gemm_eff": -1}}', "finite number"),
    ('{"format": "plait-calibration", "values": {"gemm_eff": true}}', "finite number"),
])
def test_bad_files_are_errors_for_people(tmp_path, doc, why):
    path = tmp_path / "bad.json"
    path.write_text(doc)
    with pytest.raises(PlaitError, match=why):
        calibration.read(path)


def test_a_file_from_another_device_is_refused(calib):
    job = load_job(JOB)
    job = replace(job, cluster=replace(job.cluster, device=replace(job.cluster.device, name="h100")))
    with pytest.raises(PlaitError, match="measured on device 'cpu'"):
        calibration.apply(job, calibration.read(calib))


def test_cli_errors_without_traceback(tmp_path, capsys):
    assert main(["estimate", str(JOB), "--layout", "dp=2", "--calibration",
                 str(tmp_path / "none.json")]) == 2
    assert "no calibration file" in capsys.readouterr().err
    assert main(["run", str(JOB), "--plan", str(tmp_path / "p.json"), "--calibration",
                 str(tmp_path / "c.json")]) == 2


def test_run_plans_with_the_calibration(calib, capsys):
    """`plait run --calibration`: the plan it would launch is made with the measured values."""
    from plait.commands.run import resolve_plan

    job = load_job(JOB)
    plan = resolve_plan(job, None, "dp=2", str(calib))
    assert plan.explanation[0].startswith("measured by `plait calibrate`")
    assert dict(plan.fingerprints)["calibration_file"] == calibration.read(calib).digest
    plain = resolve_plan(job, None, "dp=2")
    assert plan.prediction.step_time > plain.prediction.step_time


def test_measured_overlap_prices_fsdp_and_the_explanation_names_it(tmp_path):
    """A file's overlap_fsdp reaches the FSDP cost terms (0 serialises the gathers and scatters
    with compute: a slower step than 1) and the explanation says the value came from the
    calibration; without a file it names the literature default."""
    job = load_job(JOB)
    pins = {"dp": 8, "mbs": 2, "pp": 1, "tp": 1, "cp": 1, "recompute": "none", "dp_kind": "fsdp"}
    steps, plans = {}, {}
    for eff in (0.0, 1.0):
        path = tmp_path / f"calib-{eff}.json"
        calibration.write(path, "local-cpu", "cpu", {"overlap_fsdp": eff},
                          {"overlap_fsdp": "2 ranks"}, {})
        cal = calibration.read(path)
        plans[eff] = calibration.note(estimate(calibration.apply(job, cal), pins), cal)
        steps[eff] = plans[eff].prediction.step_time
    assert steps[0.0] > steps[1.0]
    assert "overlap_fsdp = 0" in plans[0.0].explanation[0]  # the file's line
    line = next(x for x in plans[0.0].explanation if x.startswith("FSDP traffic hidden"))
    assert "scatters 0.00 (device calibration)" in line
    plain = estimate(job, pins)
    line = next(x for x in plain.explanation if x.startswith("FSDP traffic hidden"))
    assert "scatters 0.84 (default" in line and "Lee et al. 2025" in line
    zero1 = estimate(job, {**pins, "dp_kind": "zero1"})
    assert not any(x.startswith("FSDP traffic hidden") for x in zero1.explanation)
