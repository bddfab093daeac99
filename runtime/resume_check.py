"""Resume exactness: a run checkpointed at step k and resumed equals an uninterrupted run.

For each case, on every rank: (A) train ``k + n`` steps straight through; (B) train ``k`` steps of
the same ``k + n``-step schedule and save a checkpoint; (C) build a trainer from another seed (so
every restored tensor must come from the checkpoint), load it, train the remaining ``n`` steps.
The parent compares C's losses and parameters with A's. One spawn runs all cases of one world size.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import checkpoint
from .mesh import build_mesh, destroy, init_distributed
from .parity import TIMEOUT_S, Case, Setup, spawn_cases
from .train import Trainer


@dataclass(frozen=True)
class ResumeErrors:
    losses: float  # largest |loss_C - loss_A| over the resumed steps
    params: float  # largest |param_C - param_A| over this rank's parameters, all ranks
    resumed_from: int

    @property
    def max(self) -> float:
        return max(self.losses, self.params)


def _trainer(setup: Setup, case: Case, seed: int) -> Trainer:
    plan = case.plan(setup.spec, setup.global_batch, setup.seq)
    mesh = build_mesh(plan.layout, TIMEOUT_S)
    job = replace(setup.job(mesh.world), seed=seed)
    return Trainer(job, plan, mesh, source=setup.source())


def _run_case(setup: Setup, case: Case, k: int, rank: int, out: Path) -> None:
    total = setup.steps
    whole = _trainer(setup, case, setup.seed)
    whole_losses = [float(log.loss) for log in whole.fit(total)]
    first = _trainer(setup, case, setup.seed)
    for step in range(k):
        first.train_step(step, total)
    checkpoint.save(first, out / case.name, k, total)
    resumed = _trainer(setup, case, setup.seed + 1)
    start = checkpoint.load(resumed, out / case.name)
    losses = [float(log.loss) for log in resumed.fit(total, start=start)]
    want, got = whole.dp.full_parameters(), resumed.dp.full_parameters()
    torch.save({"start": start, "whole": whole_losses[start:], "resumed": losses,
                "params": max((want[n] - got[n]).abs().max().item() for n in want)},
               out / f"{case.name}.rank{rank}.pt")


def _worker(rank: int, world: int, setup: Setup, k: int, cases: list[Case], out: str) -> None:
    torch.set_num_threads(1)
    init_distributed("gloo", TIMEOUT_S, f"file://{out}/rendezvous", rank, world)
    try:
        for case in cases:
            _run_case(setup, case, k, rank, Path(out))
    finally:
        destroy()


def run_resume(setup: Setup, cases: list[Case], k: int,
               out_dir: str | None = None) -> dict[str, ResumeErrors]:
    """Spawn one group per world size; returns each case's resume errors."""
    return {name: ResumeErrors(
                losses=max(abs(a - b) for r in recs for a, b in zip(r["whole"], r["resumed"])),
                params=max(r["params"] for r in recs), resumed_from=recs[0]["start"])
            for name, recs in spawn_cases(_worker, cases, out_dir, setup, k).items()}
