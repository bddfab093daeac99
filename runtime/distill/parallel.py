"""Distillation through the compiled runtime, under a parallel plan.

The student is the runtime's Trainer (its program, data-parallel optimizer, loader, LR schedule and
clipping), with the step's loss replaced: the teacher is lowered with the same layout, so it is
co-located — each rank holds the teacher's shard for the same tokens (same DP batch slice, same TP
vocabulary columns) — frozen (eval, no gradients), and the loss is

    (1 - lm_weight) * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + lm_weight * CE

as runtime/distill/single_device.py computes it on one device. Under TP each rank holds V/tp logit
columns; the KL is vocab-parallel the way the cross entropy is (lowering/tp_ops.py): the maxima and
the sums over the vocabulary are reduced over TP, so every rank computes the same (replicated) loss
value.
With pp > 1 the teacher runs as its own forward-only pipeline (its layers split evenly over the
same pp ranks) and its logits meet the student's on the last stage (PipelineDistillRunner).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Optional

import torch

from plait.ir.errors import LayoutError
from plait.ir.job import TrainJob
from plait.ir.model import ModelSpec
from plait.ir.plan import Layout, ParallelPlan, even_stages
from plait.lowering import collectives as cc
from plait.lowering.compile import RankProgram, lower
from plait.lowering.modules.norms import upcast

from .. import data as data_mod
from ..mesh import Mesh
from ..schedule import StepRunner
from ..train import Trainer, keep_local_children


@dataclass(frozen=True)
class DistStepLog:
    step: int
    loss: float
    kl: float
    lm: float
    grad_norm: float
    lr: float
    tokens_per_s: float


def _shift_and_lse(logits: torch.Tensor, axis: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits - row max, logsumexp of that) over a vocabulary split in columns across ``axis``
    (this rank's [N, V/size]); the logsumexp is replicated over the axis."""
    row_max = torch.ops.plait.max_over(logits.detach().amax(dim=-1), axis, size)  # no gradient
    shifted = logits - row_max.unsqueeze(-1)
    return shifted, torch.ops.plait.reduce_from_tp(shifted.exp().sum(dim=-1), axis, size).log()


def vocab_parallel_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                      axis: str = "tp", size: int = 1) -> torch.Tensor:
    """T^2 * mean over tokens of KL(teacher_T || student_T); logits [N, V/size] of this rank's
    vocabulary columns (fp32). Equals F.kl_div(..., reduction='batchmean') on the gathered logits.

    Per token, KL = sum_v p_v (log p_v - s_v) + logsumexp(s) (the teacher's p sums to one). The
    sum is reduced over TP and the logsumexp is computed from reduced sums, so the value is
    replicated and reduce_from_tp's identity backward gives each rank the exact gradient of its
    columns, (softmax(s) - p) / T. (Reducing sum_v p_v (log p_v - log softmax(s)_v) instead would
    weight the logsumexp's gradient by this rank's share of p only.)"""
    t = temperature
    s_shifted, s_lse = _shift_and_lse(student / t, axis, size)
    with torch.no_grad():
        t_shifted, t_lse = _shift_and_lse(teacher / t, axis, size)
        t_log = t_shifted - t_lse.unsqueeze(-1)
    local = (t_log.exp() * (t_log - s_shifted)).sum(dim=-1)
    return (torch.ops.plait.reduce_from_tp(local, axis, size) + s_lse).mean() * (t * t)


class DistillRunner:
    """The step's forward + backward over micro-batches (pp == 1): teacher forward without
    gradients, student forward, distillation loss, backward; gradients divided by the number of
    micro-batches afterwards, as runtime/schedule.py does."""

    def __init__(self, student: RankProgram, teacher: RankProgram, n_micro: int,
                 temperature: float, lm_weight: float):
        self.student, self.teacher, self.n_micro = student, teacher, n_micro
        self.temperature, self.lm_weight = temperature, lm_weight
        self.tp = student.plan.layout.tp
        self.last_kl = self.last_lm = 0.0  # this rank's means over the step's micro-batches

    def logits_loss(self, logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor):
        kl = vocab_parallel_kl(upcast(logits.flatten(0, 1)), upcast(teacher_logits.flatten(0, 1)),
                               self.temperature, "tp", self.tp)
        lm = self.student.loss(logits, labels)  # the compiled (vocab-parallel) cross entropy
        w = self.lm_weight
        loss = (1 - w) * kl + w * lm if w > 0 else kl
        return loss, kl.detach(), lm.detach()

    def micro_loss(self, tokens: torch.Tensor, labels: torch.Tensor):
        with torch.no_grad():
            teacher_logits = self.teacher.stage(0)(tokens)
        return self.logits_loss(self.student.stage(0)(tokens), teacher_logits, labels)

    def run(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        stage = self.student.stage(0)
        total, kls, lms = torch.zeros(()), [], []
        for tok, lab in zip(tokens.chunk(self.n_micro), labels.chunk(self.n_micro)):  # FSDP: reduce-scatter each
            loss, kl, lm = self.micro_loss(tok, lab)
            loss.backward()
            total = total + loss.detach().cpu()
            kls.append(float(kl))
            lms.append(float(lm))
        for p in stage.parameters():
            if p.grad is not None:
                p.grad.div_(self.n_micro)
        self.last_kl, self.last_lm = sum(kls) / len(kls), sum(lms) / len(lms)
        return (total / self.n_micro).to(tokens.device)


class PipelineDistillRunner(DistillRunner):
    """pp > 1: the teacher's pipeline runs forward only (the schedule's eval) and leaves its logits
    on the last pp rank, where the student's schedule then calls the distillation loss. The
    schedule splits one target tensor into micro-batches, so the teacher's logits travel with the
    labels as one more column (token ids are exact in fp32 below 2^24)."""

    def __init__(self, student: RankProgram, teacher: RankProgram, mesh: Mesh, n_micro: int,
                 temperature: float, lm_weight: float):
        super().__init__(student, teacher, n_micro, temperature, lm_weight)
        self.teacher_steps = StepRunner(teacher, mesh, n_micro)
        self.student_steps = StepRunner(student, mesh, n_micro, loss_fn=self._pipeline_loss)
        self.kls: list[float] = []
        self.lms: list[float] = []

    def _pipeline_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss, kl, lm = self.logits_loss(logits, target[..., :-1], target[..., -1].long())
        self.kls.append(float(kl))
        self.lms.append(float(lm))
        return loss

    def run(self, tokens: torch.Tensor, labels: torch.Tensor) -> Optional[torch.Tensor]:
        last = self.student.holds_loss
        args = (tokens,) if 0 in self.teacher.chunk_indices else ()
        self.kls, self.lms = [], []
        with torch.no_grad(), cc.guard("teacher pipeline send/recv", "pp"):
            teacher_logits = self.teacher_steps.schedule.eval(*args, target=labels if last else None,
                                                              return_outputs=last)
        if last:  # the teacher's logits (at least fp32) with the labels as one more column
            teacher_logits = upcast(teacher_logits)
            target = torch.cat([teacher_logits, labels.unsqueeze(-1).to(teacher_logits.dtype)], -1)
        else:
            target = None
        loss = self.student_steps.run(tokens, target if last else labels)  # labels: unused off the last stage
        if last:
            self.last_kl, self.last_lm = sum(self.kls) / len(self.kls), sum(self.lms) / len(self.lms)
        return loss


def teacher_plan(plan: ParallelPlan, teacher: ModelSpec) -> ParallelPlan:
    """The student's plan for the teacher's layers: same layout, one stage over all its layers."""
    stages = even_stages(teacher.num_layers, plan.layout.pp, plan.layout.vpp)
    return replace(plan, model=teacher.name, stages=stages)


def lower_teacher(teacher: torch.nn.Module, spec: ModelSpec, plan: ParallelPlan, mesh: Mesh) -> RankProgram:
    program = lower(teacher, spec, teacher_plan(plan, spec), mesh.rank)
    keep_local_children(program)
    program.pipe.to(mesh.device)
    program.pipe.eval()
    for p in program.pipe.parameters():
        p.requires_grad_(False)
    return program


def check_distill_layout(layout: Layout, student: ModelSpec, teacher: ModelSpec) -> None:
    chunks = layout.pp * layout.vpp
    for who, spec in (("student", student), ("teacher", teacher)):
        if spec.num_layers < chunks:
            raise LayoutError(f"the {who}'s {spec.num_layers} layers cannot fill "
                              f"pp*vpp = {layout.pp}*{layout.vpp} = {chunks} pipeline stages")
    if student.vocab != teacher.vocab:
        raise LayoutError(f"the student's vocabulary ({student.vocab}) differs from the teacher's "
                          f"({teacher.vocab}); logits cannot be compared")


class DistillTrainer:
    """Trainer of ``job.model`` (the student, weights from ``student``) distilled from ``teacher``
    (a reference module of ``teacher_spec``, frozen), on ``mesh`` under ``plan``."""

    def __init__(self, job: TrainJob, plan: ParallelPlan, mesh: Mesh, teacher_spec: ModelSpec,
                 teacher: torch.nn.Module, student: Optional[torch.nn.Module] = None,
                 temperature: float = 1.0, lm_weight: float = 0.0,
                 source: Optional[data_mod.TokenSource] = None, dtype: torch.dtype = torch.float32):
        check_distill_layout(plan.layout, job.model, teacher_spec)
        self.trainer = Trainer(job, plan, mesh, source=source, dtype=dtype, model=student)
        self.teacher = lower_teacher(teacher, teacher_spec, plan, mesh)
        if plan.layout.pp > 1:
            self.runner = PipelineDistillRunner(self.trainer.program, self.teacher, mesh,
                                                plan.num_microbatches, temperature, lm_weight)
        else:
            self.runner = DistillRunner(self.trainer.program, self.teacher, plan.num_microbatches,
                                        temperature, lm_weight)
        self.trainer.runner = self.runner  # Trainer.forward_backward runs this step instead
        self.mesh = mesh

    def _step_means(self) -> tuple[float, float]:
        """KL and LM of the step averaged over DP x CP (TP ranks hold the same values)."""
        mine = torch.tensor([self.runner.last_kl, self.runner.last_lm], dtype=torch.float64,
                            device=self.mesh.device)
        if self.mesh.coord("tp") != 0 or not self.trainer.program.holds_loss:
            mine.zero_()
        total = cc.all_reduce(mine, "sum", "world") / self.mesh.size("dp-cp")
        return float(total[0]), float(total[1])

    def train_step(self, step: int, total_steps: int) -> DistStepLog:
        start = time.perf_counter()
        log = self.trainer.train_step(step, total_steps)
        kl, lm = self._step_means()
        elapsed = time.perf_counter() - start
        plan = self.trainer.plan
        return DistStepLog(step, log.loss, kl, lm, log.grad_norm, log.lr,
                           plan.global_batch * plan.seq_len / elapsed)

    def fit(self, steps: int, start: int = 0, on_step=None, after_step=None) -> list[DistStepLog]:
        """Steps ``start`` .. ``steps - 1``; ``after_step(trainer, completed, steps)`` runs after
        each with the inner Trainer (checkpoint.Saver saves the student's runtime state)."""
        logs = []
        for step in range(start, steps):
            logs.append(self.train_step(step, steps))
            if on_step:
                on_step(logs[-1])
            if after_step:
                after_step(self.trainer, step + 1, steps)
        return logs
