"""Resume exactness: a run checkpointed at step k and resumed equals an uninterrupted run.

For each case, on every rank: (A) train ``k + n`` steps straight through; (B) train ``k`` steps of
the same ``k + n``-step schedule and save a checkpoint; (C) build a trainer from another seed (so
every restored tensor must come from the checkpoint), load it, train the remaining ``n`` steps.
The parent compares C's losses and parameters with A's. One spawn runs all cases of one world size.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from .. import checkpoint
from ..mesh import build_mesh, destroy, init_distributed
from .parity import TIMEOUT_S, Case, Setup, spawn_cases
from ..train import Trainer


@dataclass(frozen=True)
class ResumeErrors:
    losses: float  # largest |loss_C - loss_A| over the resumed steps
    params: float  # largest |param_C - param_A| over this rank's parameters, all ranks
    resumed_from: int
    replaced: float = 1.0  # fraction of a rank's parameters the load changed (fewest over ranks)

    @property
    def max(self) -> float:
        return max(self.losses, self.params)


def build_trainer(setup: Setup, case: Case, seed: int) -> Trainer:
    """The case's Trainer on this rank, its weights drawn from ``seed`` (another seed than the
    saved run's makes every restored tensor come from the checkpoint)."""
    plan = case.plan(setup.spec, setup.global_batch, setup.seq)
    mesh = build_mesh(plan.layout, TIMEOUT_S)
    job = replace(setup.job(mesh.world), seed=seed)
    return Trainer(job, plan, mesh, source=setup.source())


def run_resume_case(setup: Setup, case: Case, k: int, rank: int, out: Path) -> None:
    """Runs A (straight through), B (``k`` steps, then save) and C (load, finish) on this rank and
    saves C's losses and largest parameter difference against A."""
    total = setup.steps
    whole = build_trainer(setup, case, setup.seed)
    whole_losses = [float(log.loss) for log in whole.fit(total)]
    first = build_trainer(setup, case, setup.seed)
    for step in range(k):
        first.train_step(step, total)
    checkpoint.save(first, out / case.name, k, total)
    resumed = build_trainer(setup, case, setup.seed + 1)
    start = checkpoint.load(resumed, out / case.name)
    losses = [float(log.loss) for log in resumed.fit(total, start=start)]
    want, got = whole.dp.full_parameters(), resumed.dp.full_parameters()
    torch.save({"start": start, "whole": whole_losses[start:], "resumed": losses,
                "params": max((want[n] - got[n]).abs().max().item() for n in want)},
               out / f"{case.name}.rank{rank}.pt")


def _worker(rank: int, world: int, run_one: Callable, cases: list, out: str) -> None:
    """One rank of a spawn: ``run_one(case=, rank=, out=)`` for each case in turn."""
    torch.set_num_threads(1)
    init_distributed("gloo", TIMEOUT_S, f"file://{out}/rendezvous", rank, world)
    try:
        for case in cases:
            run_one(case=case, rank=rank, out=Path(out))
    finally:
        destroy()


def run_resume(setup: Setup, cases: list[Case], k: int,
               out_dir: str | None = None) -> dict[str, ResumeErrors]:
    """Spawn one group per world size; returns each case's resume errors."""
    records = spawn_cases(_worker, cases, out_dir, partial(run_resume_case, setup, k=k))
    return {name: ResumeErrors(
                losses=max(abs(a - b) for r in recs for a, b in zip(r["whole"], r["resumed"])),
                params=max(r["params"] for r in recs), resumed_from=recs[0]["start"])
            for name, recs in records.items()}


# ---- resharding: save under plan A, resume under plan B ----------------------------------------
@dataclass(frozen=True)
class Move:
    """Train ``k`` steps under ``a``, checkpoint, go on under ``a`` (the uninterrupted run); a
    trainer under ``b`` (same world size, another seed) loads the checkpoint and runs the same
    remaining steps. ``setup`` carries the model."""

    name: str
    a: Case
    b: Case
    setup: Setup

    @property
    def layout(self):  # spawn_cases groups by world size
        return self.a.layout


def _run_move(case: Move, k: int, rank: int, out: Path) -> None:
    move = case
    setup, total = move.setup, move.setup.steps
    whole = build_trainer(setup, move.a, setup.seed)
    losses = [float(whole.train_step(step, total).loss) for step in range(k)]
    checkpoint.save(whole, out / move.name, k, total)
    losses += [float(whole.train_step(step, total).loss) for step in range(k, total)]
    moved = build_trainer(setup, move.b, setup.seed + 1)
    before = moved.dp.full_parameters()
    start = checkpoint.load(moved, out / move.name)
    after = moved.dp.full_parameters()
    # the load must be what makes B follow A: it replaced B's own (other-seed) parameters
    replaced = sum(not torch.equal(before[n], after[n]) for n in before) / max(1, len(before))
    resumed = [float(log.loss) for log in moved.fit(total, start=start)]
    torch.save({"start": start, "whole": losses[start:], "resumed": resumed, "params": 0.0,
                "replaced": replaced}, out / f"{move.name}.rank{rank}.pt")


def run_moves(moves: list[Move], k: int, out_dir: str | None = None) -> dict[str, ResumeErrors]:
    """Each move's largest loss difference between the resumed run under B and the uninterrupted
    run under A, step by step (one spawn per world size)."""
    out = {}
    for name, recs in spawn_cases(_worker, moves, out_dir, partial(_run_move, k=k)).items():
        if any(len(r["whole"]) != len(r["resumed"]) for r in recs):
            raise AssertionError(f"{name}: the resumed run took another number of steps")
        out[name] = ResumeErrors(
            losses=max(abs(a - b) for r in recs for a, b in zip(r["whole"], r["resumed"])),
            params=0.0, resumed_from=recs[0]["start"],
            replaced=min(r["replaced"] for r in recs))
    return out
