"""Run a distillation under a parallel layout on this machine: one process per rank (gloo, file://
rendezvous in the work directory), each a DistillTrainer; the distilled student comes back whole.

    WORK/rendezvous            the process group's rendezvous file (removed before each start)
    WORK/checkpoints/          the student's runtime state (runtime/checkpoint.py, global form),
                               every ``distill.checkpoint_every`` steps and after the last: a rerun
                               resumes from the latest; the parent reads the student from it
    WORK/result.json           rank 0's step logs of this run
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Mapping, Optional

import torch

from plait.ir.cluster import local_cpu
from plait.runtime.spawn import start_ranks
from plait.ir.job import Data, Distill, LayoutPins, TrainJob
from plait.ir.model import ModelSpec
from plait.ir.plan import Layout, ParallelPlan, even_stages
from plait.lowering.build import build_model
from plait.lowering.compile import dense_layout

from .. import checkpoint
from ..data import open_source
from ..mesh import build_mesh, destroy, init_distributed
from .parallel import DistillTrainer, DistStepLog, check_distill_layout

LAYOUT_FIELDS = {f.name for f in fields(Layout)}


def layout_from_pins(pins: LayoutPins) -> Layout:
    """The layout a prune job pins (tp, dp, cp, pp, sp, ...); dimensions left `auto` are 1."""
    return Layout(**{k: v for k, v in pins.pins if k in LAYOUT_FIELDS})


@dataclass(frozen=True)
class DistillRun:
    student: ModelSpec
    teacher: ModelSpec
    layout: Layout
    distill: Distill
    data: str  # a prepared dataset directory (runtime/data.py)
    steps: int
    work: str  # the work directory (see the module docstring)
    timeout_s: float = 300

    def job(self) -> TrainJob:
        d = self.distill
        return TrainJob(name=f"distill-{self.student.name}", model=self.student,
                        cluster=local_cpu(self.layout.world), global_batch=d.global_batch,
                        seq_len=d.seq_len, precision=None, optimizer=d.optimizer, steps=self.steps,
                        data=Data(path=self.data, seed=d.seed), seed=d.seed)

    def plan(self) -> ParallelPlan:
        lay = self.layout
        return ParallelPlan(job=self.job().name, model=self.student.name, cluster="local-cpu",
                            world=lay.world, layout=lay, global_batch=self.distill.global_batch,
                            stages=even_stages(self.student.num_layers, lay.pp, lay.vpp, recompute=lay.recompute),
                            seq_len=self.distill.seq_len)


def check_run(run: DistillRun) -> None:
    """Layout errors before any process starts (pp, vocabularies, the layout rules)."""
    from plait.planner.layouts import validate_layout

    check_distill_layout(run.layout, run.student, run.teacher)
    validate_layout(run.job(), dense_layout(run.layout))  # a dense model's expert side spans the world


def _model(spec: ModelSpec, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    model = build_model(spec)
    model.load_state_dict(state, strict=True)
    return model


def _progress(step_log: DistStepLog) -> None:
    if step_log.step % 10 == 0:
        print(f"distill step {step_log.step:4d}  loss {step_log.loss:.4f}  kl {step_log.kl:.4f}  "
              f"lm {step_log.lm:.4f}  lr {step_log.lr:.2e}  {step_log.tokens_per_s:,.0f} tok/s", flush=True)


def _worker(rank: int, world: int, run: DistillRun, student_state, teacher_state, quiet: bool) -> None:
    torch.set_num_threads(1)
    work = Path(run.work)
    init_distributed("gloo", run.timeout_s, f"file://{work}/rendezvous", rank, world)
    try:
        mesh = build_mesh(run.layout, run.timeout_s)
        trainer = DistillTrainer(run.job(), run.plan(), mesh, run.teacher, _model(run.teacher, teacher_state),
                                 _model(run.student, student_state), run.distill.temperature,
                                 run.distill.lm_loss, source=open_source(run.data, run.student.vocab))
        saves = work / "checkpoints"
        start = checkpoint.load(trainer.trainer, saves) if (saves / "latest").exists() else 0
        if rank == 0 and start:
            print(f"distill: resuming at step {start} of {run.steps}", flush=True)
        saver = checkpoint.Saver(str(saves), run.distill.checkpoint_every)
        logs = trainer.fit(run.steps, start, None if quiet or rank else _progress, saver)
        if rank == 0:  # the student's weights are in the last checkpoint (global form)
            (work / RESULT).write_text(json.dumps([asdict(l) for l in logs]))
    finally:
        destroy()


def distill_parallel(run: DistillRun, student_state: Mapping[str, torch.Tensor],
                     teacher_state: Mapping[str, torch.Tensor],
                     quiet: bool = False) -> tuple[list[DistStepLog], dict[str, torch.Tensor]]:
    """Distil on ``run.layout.world`` local processes; returns rank 0's step logs (this run's
    steps) and the student's whole parameters by reference name."""
    check_run(run)
    work = Path(run.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "rendezvous").unlink(missing_ok=True)
    world = run.layout.world
    start_ranks(_worker, (world, run, dict(student_state), dict(teacher_state), quiet), world)
    logs = [DistStepLog(**l) for l in json.loads((work / RESULT).read_text())]
    return logs, _student_parameters(work / "checkpoints")


RESULT = "result.json"  # rank 0's step logs of this run (JSON: nothing in WORK is unpickled)


def _student_parameters(saves: Path) -> dict[str, torch.Tensor]:
    """The student's whole parameters by reference name, read from the distillation's last
    checkpoint (every rank's shards in their global places)."""
    from ..ckpt_export import checkpoint_tensors
    from ..ckpt_integrity import find
    from ..ckpt_store import Reader

    return dict(checkpoint_tensors(Reader(find(saves)), kinds=("model",)))
