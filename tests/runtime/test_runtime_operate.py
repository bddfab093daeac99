"""Tier 2: running jobs as an operator does. Two "nodes" on localhost train like one; a killed rank
is restarted from the newest checkpoint (--max-restarts) to the same final state; SIGTERM / SIGINT
to `plait run` stop everything it started (SIGTERM with --save checkpoints first); a failed run is
one summary naming the first failing rank and its log."""
import json
import os
import signal
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from plait.ir.cluster import local_cpu
from plait.ir.dsl import load_job
from plait.ir.plan import Layout

from operate_util import (ROOT, by_step, env, free_port, job_file, kill_rank, processes_mentioning,
                           start_run, train_records, wait_for)

pytestmark = pytest.mark.tier2


def _tiny(ranks: int, **changes):
    job = load_job(str(ROOT / "specs" / "jobs" / "tiny-local.plait"))
    return replace(job, cluster=local_cpu(ranks), global_batch=4, seq_len=32,
                   data=replace(job.data, synthetic=True, path=None), **changes)


def test_two_nodes_of_two_ranks_train_like_one_four_rank_run(tmp_path):
    from plait.runtime.cluster_launch import node_command
    from plait.runtime.launch import check_plan, hand_plan, launch_local, run_options, write_run_dir

    one = _tiny(4)
    plan = check_plan(one, hand_plan(one, Layout(pp=2, dp=2, dp_kind="zero1")))
    assert launch_local(one, plan, tmp_path / "one", steps=3, quiet=True) == 0
    two = replace(one, cluster=replace(one.cluster, nodes=2, gpus_per_node=2))
    run_dir = write_run_dir(two, plan, tmp_path / "two", **run_options(two, steps=3))
    command = node_command(two, run_dir, "two-nodes")
    node_env = dict(env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    nodes = [subprocess.Popen(["bash", "-c", command], env=node_env, stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / f"node{i}.log", "w")) for i in range(2)]
    assert [n.wait(timeout=400) for n in nodes] == [0, 0], (tmp_path / "node0.log").read_text()
    whole = json.loads((tmp_path / "one" / "log.json").read_text())
    split = json.loads((tmp_path / "two" / "log.json").read_text())
    assert [e["loss"] for e in split] == [e["loss"] for e in whole]
    assert sorted(p.name for p in run_dir.glob("rank-*.log")) == [f"rank-{r}.log" for r in range(4)]


def test_a_killed_rank_is_restarted_from_the_newest_checkpoint_to_the_same_end(tmp_path):
    spec = job_file(tmp_path)
    common = ["--steps", "8", "--save-every", "2"]
    ref = start_run(spec, *common, "--run-dir", str(tmp_path / "ref"), "--save", str(tmp_path / "c0"))
    assert ref.wait(timeout=400) == 0, ref.stderr.read()
    run_dir = tmp_path / "run"
    proc = start_run(spec, *common, "--run-dir", str(run_dir), "--save", str(tmp_path / "c1"),
                     "--max-restarts", "1")
    wait_for(lambda: (tmp_path / "c1" / "latest").is_file(), what="the first checkpoint")
    kill_rank(run_dir, 1)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err
    states = [json.loads(p.read_text()) for p in sorted((run_dir / "status").glob("rank-*.json"))]
    assert [(s["state"], s["attempt"]) for s in states] == [("finished", 1), ("finished", 1)]
    assert "attempt 1" in (run_dir / "rank-1.log").read_text()
    assert len(train_records(run_dir)) >= 8  # steps after the checkpoint may have run twice
    assert by_step(run_dir) == by_step(tmp_path / "ref")  # every step's loss and norm, exactly


def test_sigterm_checkpoints_and_stops_every_rank_and_torchrun(tmp_path):
    spec = job_file(tmp_path)
    run_dir, save = tmp_path / "run", tmp_path / "ckpt"
    proc = start_run(spec, "--steps", "400", "--run-dir", str(run_dir), "--save", str(save))
    wait_for(lambda: len(train_records(run_dir)) >= 2, what="two steps")
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=200)
    assert proc.returncode == 2 and "stopped by SIGTERM" in err, err
    assert processes_mentioning(str(run_dir)) == []  # torchrun and both ranks are gone
    states = [json.loads(p.read_text()) for p in sorted((run_dir / "status").glob("rank-*.json"))]
    assert [s["state"] for s in states] == ["stopped", "stopped"]
    (saved,) = {s["saved"] for s in states}
    done = len(train_records(run_dir))
    assert Path(saved).name == f"step-{done:06d}" and Path(saved).is_dir()
    assert f"checkpoint {saved}" in err and 2 <= done < 400


def test_sigint_stops_every_rank_without_a_checkpoint(tmp_path):
    spec = job_file(tmp_path)
    run_dir = tmp_path / "run"
    proc = start_run(spec, "--steps", "400", "--run-dir", str(run_dir))
    wait_for(lambda: len(train_records(run_dir)) >= 1, what="a step")
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=200)
    assert proc.returncode == 2 and "stopped by SIGINT" in err, err
    assert processes_mentioning(str(run_dir)) == []


def test_a_killed_rank_is_one_summary_naming_it_and_its_log(tmp_path):
    spec = job_file(tmp_path)
    run_dir = tmp_path / "run"
    proc = start_run(spec, "--steps", "400", "--run-dir", str(run_dir))
    wait_for(lambda: len(train_records(run_dir)) >= 1, what="a step")
    kill_rank(run_dir, 1)
    out, err = proc.communicate(timeout=200)
    assert proc.returncode == 2
    assert "rank 1 died without an error" in err and str(run_dir / "rank-1.log") in err
    assert "Traceback" not in err and "Traceback" not in out
    assert processes_mentioning(str(run_dir)) == []
