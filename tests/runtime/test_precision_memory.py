"""Mixed precision state on the real runtime: bytes of weights, gradients, master weights and
Adam moments per rank, measured on the Trainer after a full step (runtime/harness/memory_probe.py), equal
the plan's memory model (ir/counts.py state_tensor_bytes via planner/cost/evaluate) for bf16 and
fp8 under every data-parallel flavour, and each class has the dtype the policy promises."""
import dataclasses
from pathlib import Path

import pytest

from plait.ir.dsl import load_job
from plait.ir.job import Precision
from plait.ir.plan import Layout
from plait.planner.cost.evaluate import rank_tensor_bytes
from plait.planner.cost.pipeline import CostTable
from plait.planner.layouts import units
from plait.runtime.harness.memory_probe import measure, probe_plan

pytestmark = pytest.mark.tier2

JOBS = Path(__file__).resolve().parents[2] / "specs" / "jobs"
STATE = ("weights", "grads", "master", "master_grads", "moments")
LAYOUTS = {"dp2-replicated": Layout(dp=2, mbs=2, dp_kind="replicated"),
           "dp2-zero1": Layout(dp=2, mbs=2, dp_kind="zero1"),
           "dp2-fsdp": Layout(dp=2, mbs=2, dp_kind="fsdp"),
           "tp2-sp-zero1": Layout(tp=2, etp=2, sp=True, mbs=2, dp_kind="zero1")}
MOE = {"dp2-ep2-zero1": Layout(dp=2, ep=2, etp=1, edp=1, mbs=2, dp_kind="zero1")}


def _job(name: str, precision: Precision):
    job = load_job(JOBS / f"{name}.plait")
    return dataclasses.replace(job, precision=precision,
                               cluster=dataclasses.replace(job.cluster, gpus_per_node=2))


def _rows(name, precision, layouts, tmp):
    job = _job(name, precision)
    rows = {}
    for case, records in measure(job, layouts, str(tmp)).items():
        table = CostTable(job, layouts[case], units(job.model))
        pred = rank_tensor_bytes(table, probe_plan(job, layouts[case]).stages, 0)
        for rank, rec in enumerate(records):
            rows[case, rank] = (rec, pred)
    return rows


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    return _rows("tiny-local", Precision("bf16"), LAYOUTS, tmp_path_factory.mktemp("bf16"))


@pytest.fixture(scope="module")
def fp8_moe(tmp_path_factory):
    return _rows("tiny-moe-local", Precision("fp8", "tensorwise", 1, 1), MOE,
                 tmp_path_factory.mktemp("fp8"))


@pytest.fixture(scope="module")
def fp8_dense(tmp_path_factory):  # fp8 linears under FSDP2 (gathered bf16 weights) and TP + SP
    layouts = {k: LAYOUTS[k] for k in ("dp2-fsdp", "tp2-sp-zero1")}
    return _rows("tiny-local", Precision("fp8", "tensorwise", 1, 1), layouts,
                 tmp_path_factory.mktemp("fp8-dense"))


@pytest.mark.parametrize("term", STATE)
def test_bf16_state_bytes_equal_the_memory_model(bf16, term):
    for (case, rank), (got, pred) in bf16.items():
        # ZeRO-1 pads each flat group to a multiple of dp: a few elements
        assert got[term] == pytest.approx(pred[term], rel=0.002, abs=64), (case, rank, term)


@pytest.mark.parametrize("term", STATE)
def test_fp8_state_bytes_equal_the_memory_model(fp8_moe, fp8_dense, term):
    for (case, rank), (got, pred) in {**fp8_moe, **fp8_dense}.items():
        assert got[term] == pytest.approx(pred[term], rel=0.002, abs=64), (case, rank, term)


def test_bf16_weights_are_half_of_fp32_master(bf16):
    got, _ = bf16["dp2-replicated", 0]
    assert got["weights"] * 2 == got["master"] and got["grads"] == got["master"]
    zero1, _ = bf16["dp2-zero1", 0]
    assert zero1["master_grads"] == 0  # reduce-scattered into the fp32 gradient buffer's shard
    fsdp, _ = bf16["dp2-fsdp", 0]
    assert fsdp["weights"] == 0 and fsdp["master"] * 2 == got["master"]
