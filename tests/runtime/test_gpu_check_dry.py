"""benchmarks/gpu_check.py's code path on the CPU (what --dry-run runs, one rank): the fused-kernel
registry's fallbacks bound into bf16 and fp8 programs, the loss check against the CPU fp32
reference, measured and predicted throughput / memory in one table. The CUDA run itself needs a GPU."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from plait.runtime import data as data_mod
from plait.runtime import mesh as mesh_mod

pytestmark = pytest.mark.tier2
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_dry_run_one_rank_checks_losses_and_reports(gpu_check, tmp_path):
    data = str(tmp_path / "corpus")
    data_mod.prepare([data_mod.bundled_corpus()], data)
    cases = gpu_check.cases_for(1, dry=True)
    assert [c.precision for c in cases] == ["bf16", "fp8"]
    gpu_check.worker(0, 1, cases, True, data, str(tmp_path))
    assert not mesh_mod.dist.is_initialized()
    results = json.loads((tmp_path / "world1.json").read_text())
    refs = {c.name: gpu_check.cpu_reference(gpu_check.job_of(c, 1, True, data), c.check) for c in cases}
    table, ok = gpu_check.report(results, refs)
    assert ok and len(table.rows) == 2
    fp8 = results[cases[1].name]
    assert any("fp8 emulation" in k for k in fp8["kernels"])  # bound, as doctor reports on CPU
    assert all(r["tokens_s"] > 0 and 0 < r["pred_mfu"] < 1 for r in results.values())
