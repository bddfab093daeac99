"""Tier 2: process groups from the layout, a timed-out collective names its group and op, and
`plait run`'s launcher starting real torchrun ranks."""
import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from plait.ir.cluster import local_cpu
from plait.ir.dsl import load_job
from plait.ir.plan import Layout
from plait.runtime import mesh as mesh_mod
from plait.runtime.spawn import start_ranks

ROOT = Path(__file__).resolve().parents[2]


def _groups_and_timeout(rank: int, world: int, work: str) -> None:
    torch.set_num_threads(1)
    mesh_mod.init_distributed("gloo", 30, f"file://{work}/rdzv", rank, world)
    mesh = mesh_mod.build_mesh(Layout(tp=2, dp=2, edp=2), timeout_s=2)
    out = {"tp": list(mesh.members["tp"]), "dp": list(mesh.members["dp"])}
    if rank == 0:  # rank 1 never joins this all-reduce
        try:
            torch.ops.plait.reduce_from_tp(torch.ones(2), "tp", 2)
        except Exception as err:  # noqa: BLE001 - the message is what is tested
            out["error"] = f"{type(err).__name__}: {err}"
        Path(work, "rank0.json").write_text(json.dumps(out))
    else:  # stay alive until rank 0 has timed out, so it is a timeout and not a lost peer
        deadline = time.monotonic() + 120
        while not Path(work, "rank0.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        Path(work, f"rank{rank}.json").write_text(json.dumps(out))
    mesh_mod.destroy()


@pytest.mark.tier2
def test_groups_follow_megatron_order_and_timeouts_name_the_group(tmp_path):
    start_ranks(_groups_and_timeout, (4, str(tmp_path)), 4)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert [g["tp"] for g in got] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [g["dp"] for g in got] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert got[0]["error"].startswith("CollectiveTimeout: all_reduce(sum) on tp group [0, 1] timed out: "
                                      "rank 1 did not arrive (it entered 0 of the 1 tp collectives; "
                                      "it is alive, computing outside any collective)")


@pytest.mark.tier2
def test_plait_run_launcher_trains_two_torchrun_ranks(tmp_path):
    from plait.runtime.launch import check_plan, hand_plan, launch_local, resolve_data

    job = load_job(str(ROOT / "specs" / "jobs" / "tiny-local.plait"))
    job = replace(job, cluster=local_cpu(2), global_batch=4, seq_len=32,
                  data=replace(job.data, synthetic=False, path=None))
    plan = check_plan(job, hand_plan(job, Layout(pp=2, dp=1, dp_kind="zero1")))
    job = resolve_data(job, tmp_path)
    assert launch_local(job, plan, tmp_path / "run", steps=3) == 0
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert [entry["step"] for entry in log] == [0, 1, 2]
    assert all(0 < entry["loss"] < 6 and entry["tokens_per_s"] > 0 for entry in log)
