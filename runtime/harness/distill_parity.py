"""Numerics parity of distillation: the compiled runtime under parallel layouts (DistillTrainer)
against the single-process Distiller on the reference modules.

Both start from the same student and teacher weights and read the same batches; the runtime
records the step-0 distillation loss, its reduced gradients and the parameters after
``setup.steps`` steps (parity.record_run), and parity.compare reports the largest differences.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from plait.ir.model import ModelSpec
from plait.lowering.build import build_model

from ..data import BatchLoader
from ..distill.parallel import DistillTrainer
from ..distill.single_device import Distiller, distill_loss
from ..mesh import build_mesh, destroy, init_distributed
from .parity import (TIMEOUT_S, Case, Errors, Setup, compare_cases, one_thread, record_run,
                     spawn_cases)


@dataclass(frozen=True)
class DistillSetup:
    student: Setup  # the student's spec, batches, steps, optimizer, seed (its weights' seed too)
    teacher: ModelSpec
    teacher_seed: int = 1
    temperature: float = 2.0
    lm_weight: float = 0.25

    def for_case(self, case: Case) -> "DistillSetup":
        """This setup in the case's dtype (``Case.dtype`` overrides the student's)."""
        return replace(self, student=case.setup(self.student))

    def models(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        s = self.student
        return (build_model(s.spec, dtype=s.dtype, seed=s.seed),
                build_model(self.teacher, dtype=s.dtype, seed=self.teacher_seed))


@one_thread()
def reference(setup: DistillSetup) -> dict:
    """Step-0 loss and gradients of the Distiller's loss, and its parameters after fit()."""
    s = setup.student
    student, teacher = setup.models()
    loader = BatchLoader(s.source(), s.seq, s.global_batch, s.seed)
    probe, batch = copy.deepcopy(student), loader.local_batch(0)
    with torch.no_grad():
        teacher_logits = teacher(batch.tokens)
    loss, _, _ = distill_loss(probe(batch.tokens), teacher_logits, batch.labels,
                              setup.temperature, setup.lm_weight)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in probe.named_parameters()}
    distiller = Distiller(student, teacher, loader, s.optimizer, s.steps, setup.temperature,
                          setup.lm_weight)
    logs = distiller.fit()
    assert abs(logs[0].loss - loss.item()) < 1e-6, (logs[0].loss, loss.item())
    return {"loss": logs[0].loss, "grads": grads,
            "params": {n: p.detach().clone() for n, p in student.named_parameters()}}


def _worker(rank: int, world: int, setup: DistillSetup, cases: list[Case], out_dir: str) -> None:
    torch.set_num_threads(1)
    init_distributed("gloo", TIMEOUT_S, f"file://{out_dir}/rendezvous", rank, world)
    try:
        for case in cases:
            case_setup = setup.for_case(case)
            s = case_setup.student
            plan = case.plan(s.spec, s.global_batch, s.seq)
            mesh = build_mesh(plan.layout, TIMEOUT_S)
            student, teacher = case_setup.models()
            run = DistillTrainer(s.job(mesh.world), plan, mesh, setup.teacher, teacher, student,
                                 setup.temperature, setup.lm_weight, source=s.source(), dtype=s.dtype)
            record_run(run.trainer, s, case.name, rank, Path(out_dir))
    finally:
        destroy()


def run_distill_parity(setup: DistillSetup, cases: list[Case], out_dir: str | None = None) -> dict[str, Errors]:
    """One spawn per world size; each case's errors against the single-process Distiller (in the
    case's dtype: see parity.run_parity)."""
    records = spawn_cases(_worker, cases, out_dir, setup)
    return compare_cases(cases, records, setup.for_case, reference)
