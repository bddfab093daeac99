"""Launching a run directory on a multi-node cluster: the torchrun command each node runs (c10d
rendezvous, elastic restarts) and a Slurm batch script that runs it on every node (srun).

Both start `python -m plait.runtime.train RUN_DIR`, which reads everything it needs (job, plan,
options) from the run directory; nodes must see it at the same path (a shared filesystem), as they
must see the dataset and any --weights / --save / --resume paths, which the run directory holds
absolute.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from plait.ir.job import TrainJob

WORKER = "plait.runtime.worker"
RDZV_PORT = 29500
SBATCH = "launch.sbatch"


def node_env(job: TrainJob) -> list[str]:
    """Environment for each node's torchrun. NCCL settings only matter on GPU clusters; one OpenMP
    thread per rank on CPU clusters, a few on GPU nodes (data loading, host work)."""
    cluster = job.cluster
    threads = 1 if cluster.backend == "gloo" else max(1, 8 // cluster.gpus_per_node)
    env = [f"OMP_NUM_THREADS={threads}", f"PLAIT_THREADS={threads}", "PYTHONUNBUFFERED=1"]
    if cluster.backend == "nccl":
        env += ["TORCH_NCCL_ASYNC_ERROR_HANDLING=1", "NCCL_IB_DISABLE=0"]
    return env


def torchrun_args(job: TrainJob, run_dir: str, rdzv_id: str, endpoint: str,
                  max_restarts: int = 0, nnodes: str | None = None) -> list[str]:
    """torchrun's arguments for one node of ``job``'s cluster (c10d rendezvous at ``endpoint``:
    the same on every node; torchrun assigns the global ranks as nodes join)."""
    cluster = job.cluster
    return ["torchrun", f"--nnodes={nnodes or cluster.nodes}",
            f"--nproc-per-node={cluster.gpus_per_node}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}",
            f"--max-restarts={max_restarts}", "--monitor-interval=1", "-m", WORKER, run_dir]


def node_command(job: TrainJob, run_dir: str | Path, rdzv_id: str, max_restarts: int = 0) -> str:
    """The shell command to run on each node; MASTER_ADDR (node 0's address, required) and
    MASTER_PORT (default 29500) come from the node's environment."""
    run_dir = shlex.quote(str(run_dir))
    args = torchrun_args(job, run_dir, shlex.quote(rdzv_id),
                         f'"${{MASTER_ADDR:?set MASTER_ADDR to node 0}}:${{MASTER_PORT:-{RDZV_PORT}}}"',
                         max_restarts)
    return " \\\n  ".join([" ".join(node_env(job) + args[:1])] + args[1:-3] + [" ".join(args[-3:])])


def node_instructions(job: TrainJob, run_dir: str | Path, rdzv_id: str,
                      max_restarts: int = 0) -> str:
    cluster = job.cluster
    return (f"# run directory {run_dir}/ (job.json, plan.json, options.json): every node must see it "
            "at this path (shared filesystem).\n"
            f"# on each of the {cluster.nodes} nodes of {cluster.name}, with MASTER_ADDR = node 0's "
            "address:\n" + node_command(job, run_dir, rdzv_id, max_restarts))


def slurm_script(job: TrainJob, run_dir: str | Path, max_restarts: int = 0,
                 grace_s: int = 120) -> str:
    """An sbatch script: one srun task per node, each running torchrun for its node's ranks.
    Slurm sends SIGTERM ``grace_s`` before the time limit (--signal): plait's ranks checkpoint
    (with --save) and stop before the SIGKILL."""
    cluster = job.cluster
    run_dir = shlex.quote(str(Path(run_dir).resolve()))
    gpus = [f"#SBATCH --gpus-per-node={cluster.gpus_per_node}"] if cluster.backend == "nccl" else []
    args = torchrun_args(job, run_dir, '"$SLURM_JOB_ID"', '"$MASTER_ADDR:$MASTER_PORT"',
                         max_restarts, nnodes='"$SLURM_NNODES"')
    lines = ["#!/bin/bash", f"#SBATCH --job-name={shlex.quote(job.name)}",
             f"#SBATCH --nodes={cluster.nodes}", "#SBATCH --ntasks-per-node=1", *gpus,
             f"#SBATCH --output={run_dir}/slurm-%j.out", f"#SBATCH --signal=TERM@{grace_s}",
             "set -euo pipefail",
             'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
             f"MASTER_PORT={RDZV_PORT}", "export MASTER_ADDR MASTER_PORT",
             *(f"export {e}" for e in node_env(job)),
             "# one task per node; a failed node ends the whole step",
             "srun --kill-on-bad-exit=1 " + " ".join(args)]
    return "\n".join(lines) + "\n"
