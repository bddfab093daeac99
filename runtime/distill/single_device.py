"""Knowledge distillation of a pruned student from its frozen teacher (the model before pruning).

    loss = (1 - lm_weight) * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + lm_weight * CE

Forward KL on the logits with temperature T (Hinton et al.; T^2 keeps gradient scale independent
of T), optionally mixed with the next-token loss, as Minitron distils its pruned models.

Single process on the reference modules: the runtime's distributed Trainer builds its model from
the spec and only knows the LM loss, so distillation does not yet run under a parallel plan. The
optimizer, LR schedule and gradient clipping are the runtime's (optim.py); batches come from the
same deterministic BatchLoader. State (student, optimizer, step) is checkpointed so a run resumes.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from plait.ir.job import Optimizer as OptimizerSpec
from plait.lowering.modules.norms import upcast

from ..data import BatchLoader
from ..optim import adamw, lr_at, param_groups, set_lr


@dataclass(frozen=True)
class DistillLog:
    step: int
    loss: float
    kl: float
    lm: float
    lr: float
    tokens_per_s: float


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 temperature: float = 1.0, lm_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kl, lm) averaged over tokens; logits [b, s, vocab] are compared in (at least) fp32."""
    t = temperature
    s_log = F.log_softmax(upcast(student_logits).flatten(0, 1) / t, dim=-1)
    t_log = F.log_softmax(upcast(teacher_logits).flatten(0, 1) / t, dim=-1)
    kl = F.kl_div(s_log, t_log, log_target=True, reduction="batchmean") * (t * t)
    lm = F.cross_entropy(upcast(student_logits).flatten(0, 1), labels.flatten())
    return (1 - lm_weight) * kl + lm_weight * lm, kl.detach(), lm.detach()


class Distiller:
    def __init__(self, student: nn.Module, teacher: nn.Module, loader: BatchLoader, optimizer: OptimizerSpec,
                 steps: int, temperature: float = 1.0, lm_weight: float = 0.0):
        self.student, self.teacher, self.loader = student, teacher, loader
        self.spec, self.steps = optimizer, steps
        self.temperature, self.lm_weight = temperature, lm_weight
        self.optimizer = adamw(param_groups(student.named_parameters(), optimizer.weight_decay), optimizer)
        self.step = 0
        self.logs: list[DistillLog] = []
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    def train_step(self) -> DistillLog:
        start = time.perf_counter()
        batch = self.loader.local_batch(self.step)
        self.student.train()
        with torch.no_grad():
            teacher_logits = self.teacher(batch.tokens)
        loss, kl, lm = distill_loss(self.student(batch.tokens), teacher_logits, batch.labels,
                                    self.temperature, self.lm_weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = self.spec.grad_clip if self.spec.grad_clip > 0 else float("inf")
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), max_norm, foreach=False)
        lr = lr_at(self.step, self.spec, self.steps)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.step += 1
        elapsed = time.perf_counter() - start
        log = DistillLog(self.step - 1, float(loss.detach()), float(kl), float(lm), lr, batch.tokens.numel() / elapsed)
        self.logs.append(log)
        return log

    def fit(self, on_step: Optional[Callable[[DistillLog], None]] = None,
            checkpoint: Optional[Callable[["Distiller"], None]] = None, every: int = 50) -> list[DistillLog]:
        while self.step < self.steps:
            log = self.train_step()
            if on_step:
                on_step(log)
            if checkpoint and (self.step % every == 0 or self.step == self.steps):
                checkpoint(self)
        return self.logs

    # -- resumable state ------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"step": self.step, "student": self.student.state_dict(),
                    "optimizer": self.optimizer.state_dict(), "logs": [asdict(l) for l in self.logs]}, tmp)
        tmp.replace(path)  # atomic: an interrupted save leaves the previous checkpoint

    def load(self, path: Path) -> None:
        state = torch.load(path, weights_only=True)
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.logs = [DistillLog(**l) for l in state["logs"]]


@torch.no_grad()
def eval_loss(model: nn.Module, loader: BatchLoader, steps: range) -> float:
    """Mean next-token loss over the loader's batches ``steps`` (held-out batches)."""
    model.eval()
    losses = []
    for s in steps:
        batch = loader.local_batch(s)
        losses.append(float(model(batch.tokens, batch.labels)))
    return sum(losses) / len(losses)
