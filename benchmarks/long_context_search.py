"""Planner on long-context and hybrid jobs: search wall time, the plan it picks, and what drives it
(the attention core's share of the FLOPs per token, the exposed context-parallel communication).

    .venv/bin/python benchmarks/long_context_search.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from plait.ir import counts
from plait.ir.dsl import load_job
from plait.planner.search import search

ROOT = Path(__file__).resolve().parents[1]
JOBS = ("nemotron-h-56b-pretrain", "llama-3.1-8b-ultralong-128k", "llama-3.1-8b-ultralong-1m")


def attention_share(job) -> float:
    """Fraction of the training FLOPs per token spent in the causal attention core (s^2 term)."""
    model = job.model
    if "attention" not in model.layers:
        return 0.0
    core = model.count("attention") * counts.attention_core_flops(model, job.seq_len)
    return 3 * core / counts.flops_per_token(model, job.seq_len)


def main() -> int:
    table = Table(title="planner on hybrid and long-context jobs (2-core machine)")
    for col in ("job", "GPUs", "seq", "attn core", "search s", "ILPs", "best layout", "step s",
                "MFU", "peak GiB", "exposed cp s"):
        table.add_column(col, justify="left" if col in ("job", "best layout") else "right")
    for name in JOBS:
        job = load_job(ROOT / "specs" / "jobs" / f"{name}.plait")
        start = time.perf_counter()
        result = search(job, top=3)
        wall = time.perf_counter() - start
        best = result.best
        p = best.prediction
        cp_s = dict(p.exposed_comm).get("cp", 0.0)
        table.add_row(name, str(job.cluster.world), f"{job.seq_len // 1024}K",
                      f"{attention_share(job):.0%}", f"{wall:.2f}", str(result.solved),
                      best.layout.short(), f"{p.step_time:.2f}", f"{p.mfu:.1%}",
                      f"{p.peak_memory / 2**30:.1f}", f"{cp_s:.2f}")
    Console(width=170).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
