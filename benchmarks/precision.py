"""Precision: tiny-dense, tiny-moe and tiny-hybrid trained on the bundled English corpus in fp32,
bf16 (Megatron mixed precision) and fp8 (Nemotron-H's recipe, emulated on CPU, bf16_ends = 1 on
these 8-10 layer models) with the real Trainer; one table: the final loss (mean of the last 20
steps), its gap to fp32, and the bytes of weights, gradients and optimizer state (master, its
gradient, Adam moments) this rank holds, measured / what the plan's memory model predicts.

    .venv/bin/python benchmarks/precision.py [--steps 200]

One process (gloo world of 1, ZeRO-1 over one rank); the same tokens for every run.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from plait.ir.dsl import load_job
from plait.ir.job import Precision
from plait.ir.plan import Layout
from plait.planner.cost.evaluate import rank_tensor_bytes
from plait.planner.cost.pipeline import CostTable
from plait.planner.layouts import units
from plait.runtime import data as data_mod
from plait.runtime.harness.memory_probe import probe_plan, state_bytes
from plait.runtime.mesh import build_mesh, destroy, init_distributed
from plait.runtime.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
JOBS = {"tiny-dense": "tiny-local", "tiny-moe": "tiny-moe-local", "tiny-hybrid": "tiny-hybrid-local"}
PRECISIONS = {"fp32": Precision("fp32"), "bf16": Precision("bf16"),
              "fp8": Precision("fp8", "tensorwise", 1, 1)}
LAYOUT = Layout(mbs=8, dp_kind="zero1")
TAIL = 20  # final loss: mean over the last steps (one batch is noisy)
TIMEOUT_S = 300


def train(job, source, steps: int) -> dict:
    plan = probe_plan(job, LAYOUT)
    trainer = Trainer(job, plan, build_mesh(plan.layout, TIMEOUT_S), source=source)
    start = time.perf_counter()
    logs = trainer.fit(steps)
    seconds = (time.perf_counter() - start) / steps
    got = state_bytes(trainer)
    pred = rank_tensor_bytes(CostTable(job, LAYOUT, units(job.model)), plan.stages, 0)
    tail = logs[-min(TAIL, steps):]
    return {"loss": sum(log.loss for log in tail) / len(tail), "s_per_step": seconds,
            "got": got, "pred": pred}


def _bytes_cell(r: dict, terms: tuple[str, ...]) -> str:
    got, pred = sum(r["got"][t] for t in terms), sum(r["pred"][t] for t in terms)
    return f"{got / 1e6:.3f} / {pred / 1e6:.3f} ({got / pred:.3f})"


def table(results: dict) -> Table:
    t = Table(title="precision: final loss vs fp32, state MB measured / memory model (ratio)")
    for col in ("model", "precision", "final loss", "gap vs fp32", "weights MB", "grads MB",
                "optimizer MB", "s / step"):
        t.add_column(col, justify="left" if col in ("model", "precision") else "right")
    for model, runs in results.items():
        base = runs["fp32"]["loss"]
        for name, r in runs.items():
            t.add_row(model, name, f"{r['loss']:.4f}", f"{(r['loss'] - base) / base:+.2%}",
                      _bytes_cell(r, ("weights",)), _bytes_cell(r, ("grads",)),
                      _bytes_cell(r, ("master", "master_grads", "moments")), f"{r['s_per_step']:.3f}")
    return t


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_mod.prepare([data_mod.bundled_corpus()], Path(tmp) / "corpus")
        init_distributed("gloo", TIMEOUT_S, f"file://{tmp}/rendezvous", 0, 1)
        try:
            for model, job_name in JOBS.items():
                base = load_job(ROOT / "specs" / "jobs" / f"{job_name}.plait")
                base = dataclasses.replace(base, cluster=dataclasses.replace(base.cluster, gpus_per_node=1))
                for name, precision in PRECISIONS.items():
                    job = dataclasses.replace(base, precision=precision)
                    source = data_mod.open_source(str(Path(tmp) / "corpus"), job.model.vocab)
                    results.setdefault(model, {})[name] = train(job, source, args.steps)
        finally:
            destroy()
    Console(width=170).print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
