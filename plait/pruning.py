"""`plait prune JOB`: importance -> plan -> apply -> distill, in a resumable run directory.

    RUN/job.json                 the job this directory belongs to (another job is refused)
    RUN/importance.json          calibration scores (planner/prune/scores.py ImportanceScores)
    RUN/plan.json                the PrunePlan: ranked candidates and what the chosen one keeps
    RUN/model.plait              the pruned model as a spec (canonical DSL text)
    RUN/model.safetensors        its sliced weights (reference-model names)
    RUN/distill.pt               the distillation state, checkpointed every `checkpoint_every` steps
    RUN/distilled.safetensors    the distilled weights
    RUN/report.json              losses before / after, counts, timings

A stage whose output exists is not redone, so an interrupted run picks up where it stopped; the
distillation resumes from its last checkpoint.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from plait.ir.dsl.fmt import format_model
from plait.ir.errors import PlaitError
from plait.ir.job import PruneJob
from plait.ir.outputs import check_output_dir, claim_output_dir, output_kind
from plait.ir.plan import PrunePlan
from plait.ir.serde import to_json
from plait.planner.prune.plan import PruneResult, plan_prune
from plait.planner.prune.scores import ImportanceScores, random_scores

if TYPE_CHECKING:  # torch loads only when weights are touched: --plan-only stays fast
    import torch

Say = Callable[[str], None]
EVAL_BATCHES = 4


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __getattr__(self, name: str) -> Path:
        files = {"job": "job.json", "importance": "importance.json", "plan": "plan.json",
                 "spec": "model.plait", "weights": "model.safetensors", "state": "distill.pt",
                 "distilled": "distilled.safetensors", "report": "report.json", "data": "data"}
        if name not in files:
            raise AttributeError(name)
        return self.root / files[name]


RUN_KIND = "prune run"


def run_dir_of(job: PruneJob, out: Optional[str] = None) -> RunDir:
    return RunDir(Path(out or job.output or Path("runs") / job.name))


def check_run(job: PruneJob, out: Optional[str] = None, fresh: bool = False) -> RunDir:
    """The job's run directory, checked (nothing written) to be new, empty, or plait's run of this
    job (any plait prune run with ``fresh``)."""
    run = run_dir_of(job, out)
    check_output_dir(run.root, RUN_KIND, fresh)
    if not fresh and run.job.is_file() and run.job.read_text() != to_json(job):
        raise PlaitError(f"{run.root} holds a run of a different (or changed) prune job",
                         hint="pass --fresh to start over there, or --out another directory")
    return run


def open_run(job: PruneJob, out: Optional[str] = None, fresh: bool = False) -> RunDir:
    """The job's run directory, created (or emptied with ``fresh``) after check_run's checks."""
    run = check_run(job, out, fresh)
    claim_output_dir(run.root, RUN_KIND, fresh)
    run.job.write_text(to_json(job))
    return run


# ------------------------------------------------------------------------------------------------
# Data and models
# ------------------------------------------------------------------------------------------------

def token_source(data: Optional[str], run: RunDir, vocab: int):
    """A dataset directory, or the bundled corpus prepared once into the run directory."""
    from plait.runtime import data as data_mod

    if data is None:
        if not (run.data / data_mod.META).exists():
            data_mod.prepare([data_mod.bundled_corpus()], run.data)
        data = str(run.data)
    return data_mod.open_source(data, vocab)


def calibration_batches(job: PruneJob, run: RunDir) -> list[torch.Tensor]:
    from plait.runtime.data import BatchLoader

    cal = job.calibration
    loader = BatchLoader(token_source(cal.data, run, job.model.vocab), cal.seq_len, cal.batch, cal.seed)
    n = -(-cal.samples // cal.batch)
    return [loader.local_batch(i).tokens for i in range(n)]


def load_model_weights(spec, state) -> torch.nn.Module:
    from plait.lowering.build import build_model

    model = build_model(spec)
    model.load_state_dict(state, strict=True)
    return model


def _weights_path(job: PruneJob) -> str:
    if job.weights is None:
        raise PlaitError(f'prune job "{job.name}" names no weights', hint='add weights = "model.safetensors", '
                         "or run with --plan-only")
    return job.weights


# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------

def importance(job: PruneJob, run: RunDir, teacher: torch.nn.Module, say: Say) -> ImportanceScores:
    if run.importance.exists():
        say(f"importance: reusing {run.importance}")
        return ImportanceScores.from_json(run.importance.read_text())
    start = time.perf_counter()
    method = job.calibration.method
    layout = parallel_layout(job)
    if method == "activation" and layout is not None:  # the batches split over the layout's ranks
        from plait.runtime.calibrate_dist import calibrate_parallel
        say(f"importance: calibrating data parallel on up to {layout.world} processes")
        scores = calibrate_parallel(job.model, teacher.state_dict(), calibration_batches(job, run), layout.world,
                                    run.root / "calibrate", job.calibration.depth)
    elif method == "activation":
        from plait.lowering.prune.importance import activation_scores
        scores = activation_scores(teacher, job.model, calibration_batches(job, run), depth=job.calibration.depth)
    elif method == "magnitude":
        from plait.lowering.prune.importance import magnitude_scores
        scores = magnitude_scores(teacher, job.model)
    else:
        scores = random_scores(job.model, job.calibration.seed)
    run.importance.write_text(scores.to_json())
    say(f"importance: {method} scores over {scores.tokens:,} tokens in {time.perf_counter() - start:.2f} s")
    return scores


def plan(job: PruneJob, run: RunDir, scores: Optional[ImportanceScores], top: int, say: Say) -> PrunePlan:
    if run.plan.exists():
        say(f"plan: reusing {run.plan}")
        return PrunePlan.from_json(run.plan.read_text())
    result = plan_prune(job, scores, top=top)
    run.plan.write_text(result.plan.to_json())
    say(f"plan: {len(result.plan.candidates)} candidates in {result.seconds:.2f} s ({result.solves} ILP solves)")
    return result.plan


def apply(plan_: PrunePlan, job: PruneJob, run: RunDir, teacher_state: dict, say: Say) -> dict:
    from plait.lowering.prune.checkpoint import save_weights
    from plait.lowering.prune.slicing import check_pruned, slice_state_dict

    if run.weights.exists() and run.spec.exists():
        from safetensors.torch import load_file
        say(f"apply: reusing {run.weights}")
        return load_file(str(run.weights))
    state = slice_state_dict(teacher_state, job.model, plan_)
    n = check_pruned(state, plan_)
    save_weights(state, run.weights)
    run.spec.write_text(format_model(plan_.model))
    say(f"apply: {n:,} parameters -> {run.weights}, spec -> {run.spec}")
    return state


def distill(job: PruneJob, run: RunDir, teacher, student, steps: int, say: Say,
            on_step=None) -> list:
    from plait.runtime.data import BatchLoader
    from plait.runtime.distill.single_device import Distiller

    d = job.distill
    source = token_source(d.data, run, job.model.vocab)
    if parallel_layout(job) is not None:
        return distill_parallel(job, run, teacher, student, steps, say, quiet=on_step is None)
    loader = BatchLoader(source, d.seq_len, d.global_batch, d.seed)
    distiller = Distiller(student, teacher, loader, d.optimizer, steps, d.temperature, d.lm_loss)
    if run.state.exists():
        distiller.load(run.state)
        say(f"distill: resuming at step {distiller.step} of {steps}")
    logs = distiller.fit(on_step, checkpoint=lambda dist: dist.save(run.state), every=d.checkpoint_every)
    from plait.lowering.prune.checkpoint import save_weights
    save_weights(student.state_dict(), run.distilled)
    return logs


def parallel_layout(job: PruneJob):
    """The layout the job pins when it spans more than one rank (distillation then runs in the
    compiled runtime under it), else None (one process on the reference modules)."""
    from plait.runtime.distill.launch import layout_from_pins

    layout = layout_from_pins(job.layout)
    return layout if layout.world > 1 else None


def distill_parallel(job: PruneJob, run: RunDir, teacher, student, steps: int, say: Say,
                     quiet: bool = False) -> list:
    """Distil under the job's layout on local processes (runtime/distill/launch.py); the student
    module takes the distilled weights. Checkpoints in RUN/distill/ make a rerun resume."""
    import torch

    from plait.lowering.prune.checkpoint import save_weights
    from plait.runtime.distill.launch import DistillRun, distill_parallel as launch

    d = job.distill
    layout = parallel_layout(job)
    spec = student.spec  # the reference module (build_model) carries its ModelSpec
    say(f"distill: {steps} steps in the runtime under {layout.short()} ({layout.world} processes)")
    plan = DistillRun(student=spec, teacher=job.model, layout=layout, distill=d,
                      data=d.data or str(run.data), steps=steps, work=str(run.root / "distill"))
    logs, params = launch(plan, student.state_dict(), teacher.state_dict(), quiet=quiet)
    with torch.no_grad():
        for name, p in student.named_parameters():
            p.copy_(params[name])
    save_weights(student.state_dict(), run.distilled)
    return logs


def eval_loss(job: PruneJob, run: RunDir, model) -> float:
    from plait.runtime.data import BatchLoader
    from plait.runtime.distill.single_device import eval_loss as mean_loss

    d = job.distill
    loader = BatchLoader(token_source(d.data, run, job.model.vocab), d.seq_len, d.global_batch, d.seed + 1)
    return mean_loss(model, loader, range(EVAL_BATCHES))


def train_teacher(job: PruneJob, steps: int, say: Say = print, out: Optional[str] = None,
                  fresh: bool = False) -> Path:
    """Train the source model from its initialisation for ``steps`` steps on the distillation data
    (default: the bundled corpus) and save it as the job's weights: a teacher for demos and tests
    where no trained checkpoint exists."""
    from plait.ir.job import Optimizer
    from plait.lowering.build import build_model
    from plait.lowering.prune.checkpoint import save_weights
    from plait.runtime.data import BatchLoader
    from plait.runtime.train import ReferenceTrainer

    target = Path(_weights_path(job))
    _check_teacher_target(target)
    run = open_run(job, out, fresh)
    d = job.distill
    loader = BatchLoader(token_source(d.data, run, job.model.vocab), d.seq_len, d.global_batch, d.seed)
    model = build_model(job.model, seed=d.seed)
    trainer = ReferenceTrainer(model, Optimizer(lr=3e-3, min_lr=3e-4, warmup=min(20, steps // 10)))
    for step in range(steps):
        loss = trainer.forward_backward(*_batch(loader, step))
        trainer.step(step, steps)
        if step % 50 == 0 or step == steps - 1:
            say(f"teacher step {step:4d}  loss {float(loss):.4f}")
    if not target.parent.exists():
        claim_output_dir(target.parent, TEACHER_KIND)
    save_weights(model.state_dict(), target)
    say(f"teacher: {target}")
    return target


TEACHER_KIND = "teacher checkpoint"


def _check_teacher_target(target: Path) -> None:
    """The teacher may replace weights only where plait wrote a teacher before."""
    if target.is_dir():
        raise PlaitError(f"the job's weights {target} is a directory; --train-teacher writes one file",
                         hint='point weights at a new file, e.g. weights = "teacher/model.safetensors"')
    if target.exists() and output_kind(target.parent) != TEACHER_KIND:
        raise PlaitError(f"--train-teacher would overwrite {target}, which plait did not write",
                         hint="point the job's weights at a new path, or move that file away")


def _batch(loader, step: int):
    b = loader.local_batch(step)
    return b.tokens, b.labels


# ------------------------------------------------------------------------------------------------
# The whole run
# ------------------------------------------------------------------------------------------------

def plan_only(job: PruneJob, top: int = 5, scores: Optional[ImportanceScores] = None) -> PruneResult:
    """Ranked candidates without touching weights (the uniform prior unless scores are given)."""
    return plan_prune(job, scores, top=top)


def run_prune(job: PruneJob, out: Optional[str] = None, fresh: bool = False, top: int = 5,
              steps: Optional[int] = None, say: Say = print, on_step=None) -> dict:
    """plan -> apply -> distill; returns the report (also written to RUN/report.json)."""
    from plait.lowering.prune.checkpoint import read_weights

    check_run(job, out, fresh)  # every input checked before the run directory is touched
    teacher_state = read_weights(job.model, _weights_path(job))
    run = open_run(job, out, fresh)
    teacher = load_model_weights(job.model, teacher_state)
    scores = importance(job, run, teacher, say)
    chosen = plan(job, run, scores, top, say)
    student = load_model_weights(chosen.model, apply(chosen, job, run, teacher_state, say))
    steps = job.distill.steps if steps is None else steps
    report = {"job": job.name, "run": str(run.root), "params_before": _params(job.model),
              "params_after": chosen.chosen.params, "teacher_loss": eval_loss(job, run, teacher),
              "pruned_loss": eval_loss(job, run, student), "distill_steps": steps}
    if steps > 0:
        logs = distill(job, run, teacher, student, steps, say, on_step)
        report["distilled_loss"] = eval_loss(job, run, student)
        report["distill_final_kl"] = logs[-1].kl if logs else None
    run.report.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _params(model) -> int:
    from plait.ir import counts
    return counts.params(model).total
