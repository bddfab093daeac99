"""Planner speed: wall time of the full search (enumerate -> bound -> ILP -> rank) per job, with the
layouts enumerated / pruned / ILPs solved and the winner. Targets on a 2-core machine: <= 5 s up
to 1,024 GPUs, <= 30 s at 16,384.

    .venv/bin/python benchmarks/search_speed.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from plait.ir.dsl import load_job
from plait.planner.search import search

ROOT = Path(__file__).resolve().parents[1]
JOBS = ("mixtral-8x22b-128gpu", "mixtral-8x22b-1024gpu", "qwen2-57b-a14b-64gpu",
        "llama-3.1-405b-16384gpu-8k", "llama-3.1-405b-16384gpu-128k", "nemotron-h-56b-pretrain")


def main() -> int:
    t = Table(title="planner search speed")
    for col in ("job", "GPUs", "wall s", "cpu s", "target s", "enumerated", "pruned", "ILPs",
                "best layout", "MFU"):
        t.add_column(col, justify="left" if col in ("job", "best layout") else "right")
    ok = True
    for name in JOBS:
        job = load_job(ROOT / "specs" / "jobs" / f"{name}.plait")
        wall, cpu = time.perf_counter(), time.process_time()
        res = search(job)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        target = 5.0 if job.cluster.world <= 1024 else 30.0
        ok &= wall <= target
        best = res.best
        t.add_row(name, str(job.cluster.world), f"{wall:.2f}", f"{cpu:.2f}", f"{target:.0f}",
                  str(res.enumerated), str(res.pruned), str(res.solved),
                  best.layout.short() if best else "none fits",
                  f"{best.prediction.mfu:.1%}" if best else "-")
    t.caption = "all within target" if ok else "SOME SEARCHES OVER TARGET (is the machine busy?)"
    Console(width=200).print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
