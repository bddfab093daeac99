"""Pruning quality at toy scale, measured side by side in one run (one table):

  * a tiny model (default tiny-dense) trained briefly on the bundled corpus: the teacher;
  * pruned to ~50% of its parameters in width: the architecture the pruning ILP picks from
    activation importance, its channels and heads chosen by activation importance vs weight
    magnitude vs random scores -> held-out loss right after pruning, no training (and the ILP's
    own pick when it may also drop layers);
  * the activation-pruned student distilled for N steps vs the same architecture trained from
    scratch for N steps on the same batches (Minitron's claim);
  * planning time of the nemotron-h-8b and llama-3.1-8b -> 4.5B library jobs (plan only), and the
    importance-estimation time.

    .venv/bin/python benchmarks/prune_quality.py [--model tiny-dense] [--teacher-steps 300] [--steps 60]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from plait.ir import counts
from plait.ir.dsl import load_model, load_prune_job
from plait.commands.prune import widths_text
from plait.ir.job import AxisSearch, Optimizer, PruneJob, PruneTarget
from plait.lowering.build import build_model
from plait.lowering.prune.importance import activation_scores, magnitude_scores
from plait.lowering.prune.slicing import slice_state_dict
from plait.planner.prune.plan import plan_for_architecture, plan_prune
from plait.planner.prune.scores import random_scores
from plait.runtime import data as data_mod
from plait.runtime.distill.single_device import Distiller, eval_loss
from plait.runtime.train import ReferenceTrainer

ROOT = Path(__file__).resolve().parents[1]
SEQ, BATCH, EVAL = 64, 8, range(6)


def loaders(tmp: Path):
    data_mod.prepare([data_mod.bundled_corpus()], tmp)
    source = data_mod.MemmapTokens(tmp)
    train = data_mod.BatchLoader(source, SEQ, BATCH, seed=0)
    held_out = data_mod.BatchLoader(source, SEQ, BATCH, seed=12345)
    return train, held_out


def train(model, loader, steps: int, lr: float) -> None:
    trainer = ReferenceTrainer(model, Optimizer(lr=lr, min_lr=lr / 10, warmup=min(20, steps // 10)))
    for step in range(steps):
        b = loader.local_batch(step)
        trainer.forward_backward(b.tokens, b.labels)
        trainer.step(step, steps)


def student_of(teacher, job: PruneJob, plan):
    student = build_model(plan.model)
    student.load_state_dict(slice_state_dict(teacher.state_dict(), job.model, plan))
    return student


def planning_seconds(path: str, repeats: int = 3) -> tuple[float, str]:
    job = load_prune_job(str(ROOT / "specs" / "jobs" / path))
    times, best = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        best = plan_prune(job).plan.chosen
        times.append(time.perf_counter() - start)
    m = best.model
    shape = f"{best.params / 1e9:.3f} B: hidden {m.hidden}, ffn {m.mlp.ffn}" + (
        f", mamba heads {m.mamba.heads}" if m.mamba else "")
    return statistics.median(times), shape


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-dense")
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=60, help="distillation / from-scratch steps")
    ap.add_argument("--fraction", type=float, default=0.5, help="parameter budget as a fraction")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []

    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        train_loader, held_out = loaders(Path(tmp))
        model = load_model(str(ROOT / "specs" / "models" / f"{args.model}.plait"))
        teacher = build_model(model, seed=0)
        start = time.perf_counter()
        train(teacher, train_loader, args.teacher_steps, 3e-3)
        rows.append(("teacher", f"{counts.params(model).total:,}", f"{eval_loss(teacher, held_out, EVAL):.4f}",
                     f"{args.teacher_steps} steps from scratch ({time.perf_counter() - start:.0f} s)"))

        kinds = tuple(dict.fromkeys(model.layers))
        axes = [AxisSearch(a, "search") for a in ("hidden", "ffn", "attention_heads", "mamba_heads", "experts")
                if a == "hidden" or {"ffn": "mlp", "attention_heads": "attention", "mamba_heads": "mamba",
                                     "experts": "moe"}[a] in kinds]
        job = PruneJob(name=f"{args.model}-pruned", model=model, axes=tuple(axes),
                       target=PruneTarget(params=int(args.fraction * counts.params(model).total)))
        batches = [train_loader.local_batch(10_000 + i).tokens for i in range(4)]
        start = time.perf_counter()
        act = activation_scores(teacher, model, batches)
        act_s = time.perf_counter() - start
        start = time.perf_counter()
        mag = magnitude_scores(teacher, model)
        mag_s = time.perf_counter() - start
        arch = plan_prune(job, act, top=1).plan.model  # widths only: every estimator ranks channels
        students = {}
        for name, scores in (("activation", act), ("magnitude", mag), ("random", random_scores(model, 0))):
            plan = plan_for_architecture(job, scores, arch)
            students[name] = student_of(teacher, job, plan)
            rows.append((f"pruned by {name}", f"{plan.chosen.params:,}",
                         f"{eval_loss(students[name], held_out, EVAL):.4f}",
                         "no training; " + (_shape(arch) if name == "activation" else "same architecture")))
        deep = plan_prune(replace(job, depth=kinds), act, top=1).plan
        rows.append(("activation, layers may go too", f"{deep.chosen.params:,}",
                     f"{eval_loss(student_of(teacher, job, deep), held_out, EVAL):.4f}",
                     f"no training; the ILP's pick with depth allowed: {_shape(deep.model)}"))

        distiller = Distiller(students["activation"], teacher, train_loader, Optimizer(lr=2e-3, min_lr=2e-4, warmup=5),
                              args.steps, temperature=1.0, lm_weight=0.0)
        start = time.perf_counter()
        distiller.fit()
        rows.append((f"activation-pruned + distil {args.steps}", f"{counts.params(arch).total:,}",
                     f"{eval_loss(students['activation'], held_out, EVAL):.4f}",
                     f"forward KL to the teacher, T = 1 ({time.perf_counter() - start:.0f} s)"))
        scratch = build_model(arch, seed=1)
        train(scratch, train_loader, args.steps, 3e-3)
        rows.append((f"same architecture, scratch {args.steps}", f"{counts.params(arch).total:,}",
                     f"{eval_loss(scratch, held_out, EVAL):.4f}", "LM loss, same batches"))
        rows.append(("importance estimation", "-", f"{act_s:.3f} s",
                     f"activation hooks, {act.tokens:,} tokens; magnitude {mag_s:.3f} s"))

    for path in ("nemotron-h-8b-prune-4.5b.plait", "llama-3.1-8b-prune-4.5b.plait"):
        seconds, shape = planning_seconds(path)
        rows.append((f"plan {path.split('-prune')[0]} -> 4.5B", shape.split(":")[0], f"{seconds:.3f} s",
                     "median of 3, plan only (uniform prior); best " + shape.split(": ", 1)[1]))

    table = Table(title=f"pruning quality: {args.model} to {args.fraction:.0%} of its parameters, "
                        f"held-out loss (bytes, nats) on the bundled corpus")
    for col in ("model / measure", "params", "loss / time", "note"):
        table.add_column(col, justify="right" if col in ("params", "loss / time") else "left")
    for row in rows:
        table.add_row(*row)
    Console(width=200).print(table)
    return 0


def _shape(m) -> str:
    return f"{widths_text(m)}, {m.num_layers} layers"


if __name__ == "__main__":
    sys.exit(main())
