"""Start the ranks: torchrun (torch.distributed.run) command lines, local and multi-node.

Every plan is checked against its job (world size, divisibility, stage partition) here, before any
process starts, so a bad plan is reported with its arithmetic instead of eight tracebacks.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from plait.ir import legality
from plait.ir.datarecipe import check_sources_exist
from plait.ir.errors import LayoutError, PlaitError
from plait.ir.job import TrainJob
from plait.ir.plan import Layout, ParallelPlan, even_stages
from plait.ir.serde import to_json
from plait.lowering.compile import dense_layout
from plait.lowering.passes.base import Target
from plait.lowering.passes.split_pipeline import ordered_chunks

from . import data as data_mod
from . import supervise
from .cluster_launch import WORKER


def check_plan(job: TrainJob, plan: ParallelPlan) -> ParallelPlan:
    """The plan, with its dense expert side filled in, if plait can run it for this job: every row
    of the legality-and-capability table (Megatron's rules and what plait's runtime executes,
    ir/legality.py) and the stage partition; else LayoutError listing what breaks, with the
    arithmetic, before any process starts."""
    layout = dense_layout(plan.layout)
    plan = replace(plan, layout=layout)
    if plan.world != layout.world:  # the plan file's own fields disagree
        raise LayoutError(f"plan world {plan.world} != tp*cp*dp*pp = {layout.tp}*{layout.cp}*"
                          f"{layout.dp}*{layout.pp} = {layout.world}")
    legality.table(legality.Workload.of_job(job)).require(layout, what=f"job {job.name!r}")
    ordered_chunks(Target(spec=job.model, plan=plan))
    return plan


def hand_plan(job: TrainJob, layout: Layout) -> ParallelPlan:
    """A plan written by hand: the given layout, even stages, the job's batch."""
    layout = dense_layout(layout)
    return ParallelPlan(job=job.name, model=job.model.name, cluster=job.cluster.name,
                        world=layout.world, layout=layout,
                        stages=even_stages(job.model.num_layers, layout.pp, layout.vpp,
                                           recompute=layout.recompute),
                        global_batch=job.global_batch, seq_len=job.seq_len,
                        schedule="interleaved" if layout.vpp > 1 else "1f1b",
                        moe=job.moe if job.model.is_moe else None)


def resolve_data(job: TrainJob, cache: Path) -> TrainJob:
    """A job that names no dataset (and is not synthetic) trains on the bundled corpus."""
    if job.data.sources:  # a blend: every source must be there before ranks start
        check_sources_exist(job)
        return job
    if job.data.synthetic or job.data.path:
        if job.data.path and not Path(job.data.path).exists():
            raise PlaitError(f"dataset {job.data.path} does not exist",
                             hint="build it with `plait data prepare FILES -o DIR`")
        return job
    target = cache / "bundled-corpus"
    if not (target / data_mod.META).is_file():
        data_mod.prepare([data_mod.bundled_corpus()], target)
    return replace(job, data=replace(job.data, path=str(target)))


def write_run_dir(job: TrainJob, plan: ParallelPlan, run_dir: Path, **options) -> Path:
    """RUN_DIR/{job,plan,options}.json: everything a rank needs (the job holds the dataset path;
    options: steps, timeout, weights, checkpointing, restarts), so a run directory is the whole
    launch, here or on a cluster."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "job.json").write_text(to_json(job) + "\n")
    (run_dir / "plan.json").write_text(plan.to_json() + "\n")
    (run_dir / "options.json").write_text(json.dumps(options, indent=1) + "\n")
    return run_dir


def local_command(run_dir: Path, nprocs: int, max_restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc-per-node={nprocs}", f"--max-restarts={max_restarts}", "--monitor-interval=1",
            "-m", WORKER, str(run_dir)]


@dataclass(frozen=True)
class Checkpointing:
    """`plait run --save DIR --save-every N --async-save --resume DIR --allow-job-change`."""

    save: Optional[str] = None
    every: int = 0
    resume: Optional[str] = None
    asynchronous: bool = False
    allow_job_change: bool = False

    def options(self) -> dict:
        absolute = lambda p: str(Path(p).resolve()) if p else None  # noqa: E731
        return {"save": absolute(self.save), "save_every": self.every,
                "resume": absolute(self.resume), "async_save": self.asynchronous}


def check_resume(job: TrainJob, plan: ParallelPlan, ckpt: Checkpointing,
                 steps: Optional[int]) -> Optional[int]:
    """Before any process starts: the checkpoint exists, every file matches its manifest, it holds
    this model, the job's math and data order are unchanged (unless allowed), and steps are left
    to run; returns its step (None without --resume). Any plan of the model may resume it."""
    if ckpt.every < 0:
        raise PlaitError(f"--save-every must be >= 0, got {ckpt.every}")
    if not ckpt.resume:
        return None
    from .ckpt_integrity import check_job, check_model, find, read_meta, verify
    where = find(ckpt.resume)
    meta = read_meta(where)  # refuses pickled (DCP) metadata before anything reads it
    verify(where)
    check_model(where, meta, job.model)
    total = steps or job.steps
    check_job(where, meta, job, total, ckpt.allow_job_change)
    if meta["step"] >= total:
        raise PlaitError(f"checkpoint {ckpt.resume} has completed {meta['step']} steps; the run "
                         f"has {total}", hint="raise --steps to train further")
    return meta["step"]


def check_local_devices(job: TrainJob, plan: ParallelPlan) -> None:
    """An NCCL cluster runs here only with one visible GPU per rank (a silent fall back to the CPU
    would train a GPU-sized job on gloo)."""
    if job.cluster.backend != "nccl":
        return
    from .device import choose
    if choose("nccl", rank_on_node=plan.world - 1).backend != "nccl":  # raises: too few GPUs
        raise PlaitError(f"cluster {job.cluster.name!r} trains with NCCL on GPUs, but no CUDA "
                         "device is visible here",
                         hint="run on a GPU node, or use a gloo cluster such as local-cpu")


def run_options(job: TrainJob, steps: Optional[int] = None, weights: Optional[str] = None,
                ckpt: Checkpointing = Checkpointing(), timeout_s: Optional[float] = None,
                max_restarts: int = 0) -> dict:
    """options.json: what `plait run` was told beyond the job (paths absolute: ranks may start
    elsewhere)."""
    return {"steps": steps, "timeout_s": timeout_s or job.timeout,
            "weights": str(Path(weights).resolve()) if weights else None,
            "max_restarts": max_restarts, **ckpt.options()}


def check_restarts(max_restarts: int, ckpt: Checkpointing) -> None:
    if max_restarts < 0:
        raise PlaitError(f"--max-restarts must be >= 0, got {max_restarts}")
    if max_restarts and not ckpt.save:
        raise PlaitError("--max-restarts needs --save DIR",
                         hint="restarted ranks continue from the newest checkpoint under --save")


def launch_local(job: TrainJob, plan: ParallelPlan, run_dir: Path, steps: Optional[int] = None,
                 timeout_s: Optional[float] = None, quiet: bool = False,
                 weights: Optional[str] = None, ckpt: Checkpointing = Checkpointing(),
                 max_restarts: int = 0) -> int:
    """Run all ranks on this machine with torchrun (each rank picks NCCL + its GPU or gloo + CPU,
    runtime.device); returns the exit status (128 + N when `plait run` got signal N). Rank N's
    output is in RUN_DIR/rank-N.log, rank 0's progress also on the terminal (with quiet, in
    RUN_DIR/ranks.log); torchrun's own in RUN_DIR/torchrun.log."""
    if job.cluster.nodes != 1:
        raise PlaitError(f"cluster {job.cluster.name!r} is not local ({job.cluster.nodes} nodes)",
                         hint="print its launch command with `plait run --print-launch`")
    check_local_devices(job, plan)
    if weights and not Path(weights).exists():
        raise PlaitError(f"weight file not found: {weights}")
    check_resume(job, plan, ckpt, steps)
    check_restarts(max_restarts, ckpt)
    write_run_dir(job, plan, run_dir, **run_options(job, steps, weights, ckpt, timeout_s,
                                                    max_restarts))
    from .train import NON_FINITE_EXIT, STOPPED

    (run_dir / STOPPED).unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PLAIT_THREADS="1", PYTHONUNBUFFERED="1")
    command = local_command(run_dir, plan.world, max_restarts)
    with open(run_dir / "torchrun.log", "a") as agent_log, \
            open(run_dir / "ranks.log", "a") if quiet else open(os.devnull, "w") as quiet_log:
        out = supervise.supervise(command, env, stdout=quiet_log if quiet else None,
                                  stderr=agent_log)
    if out.signal:
        return 128 + out.signal
    # torchrun reports any failing rank as 1; the ranks' own record says why they stopped
    return NON_FINITE_EXIT if out.status != 0 and (run_dir / STOPPED).is_file() else out.status
