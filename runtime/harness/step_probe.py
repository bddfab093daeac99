"""Step-time truth: train a plan for a few steps on local gloo ranks and report each step's wall
time and the rank's tensor bytes, for benchmarks/predict_vs_measure.py to put next to the cost
model's prediction. The runtime decides nothing here: it trains the plan it is given."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from plait.ir.plan import Layout, ParallelPlan, even_stages

from .memory_probe import state_bytes
from ..mesh import build_mesh, destroy, init_distributed, set_threads
from .parity import Case, spawn_cases
from ..train import Trainer

TIMEOUT_S = 300


def step_plan(job, layout: Layout) -> ParallelPlan:
    """The job's global batch, even stages, the layout's recompute."""
    return ParallelPlan(job=job.name, model=job.model.name, cluster=job.cluster.name,
                        world=layout.world, layout=layout,
                        stages=even_stages(job.model.num_layers, layout.pp, layout.vpp,
                                           recompute=layout.recompute),
                        global_batch=job.global_batch, seq_len=job.seq_len)


@contextmanager
def local_rank(rank: int, world: int, rendezvous_dir: str):
    """This process as rank ``rank`` of ``world`` local gloo ranks for the block: one thread, a
    file:// rendezvous in ``rendezvous_dir``, TIMEOUT_S on every group."""
    set_threads()
    init_distributed("gloo", TIMEOUT_S, f"file://{rendezvous_dir}/rendezvous", rank, world)
    try:
        yield
    finally:
        destroy()


def trainer_for(job, layout: Layout) -> Trainer:
    """The runtime's trainer of ``job`` under ``layout`` (step_plan) on this rank's mesh."""
    plan = step_plan(job, layout)
    return Trainer(job, plan, build_mesh(plan.layout, TIMEOUT_S))


def _worker(rank: int, world: int, job, steps: int, cases: list[Case], out_dir: str) -> None:
    with local_rank(rank, world, out_dir):
        for case in cases:
            trainer = trainer_for(job, case.layout)
            times = [trainer.train_step(s, steps).step_time for s in range(steps)]
            torch.save({"times": times, **state_bytes(trainer)},
                       Path(out_dir) / f"{case.name}.rank{rank}.pt")


def measure_steps(job, layouts: dict[str, Layout], steps: int,
                  out_dir: str | None = None) -> dict[str, list[dict]]:
    """{case: [per rank {"times": [seconds per step], weights, grads, master, ...}]}; one spawn
    per world size."""
    cases = [Case(name, lay) for name, lay in layouts.items()]
    return spawn_cases(_worker, cases, out_dir, job, steps)
