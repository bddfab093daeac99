"""Plan quality: for the two MoE calibration jobs, plait's top plan must predict at least the
throughput plait predicts for the MoE Parallel Folding paper's best (folding) layout.

    .venv/bin/python benchmarks/plan_quality.py
"""
from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from plait.ir.dsl import load_job
from plait.planner.search import estimate, search

ROOT = Path(__file__).resolve().parents[1]
# the paper's folding layouts (reference/moe_folding_table3.csv); micro-batch / vpp are searched
PAPER = {"mixtral-8x22b-128gpu": {"cp": 1, "tp": 2, "ep": 8, "pp": 8, "etp": 1},
         "qwen2-57b-a14b-64gpu": {"cp": 1, "tp": 2, "ep": 4, "pp": 4, "etp": 1}}


def main() -> int:
    t = Table(title="plan quality: plait's top plan vs the paper's folding layout (both predicted)")
    for col in ("job", "paper layout", "paper MFU", "plait layout", "plait MFU", "gain", "ok"):
        t.add_column(col, justify="right" if "MFU" in col or col == "gain" else "left")
    all_ok = True
    for name, pins in PAPER.items():
        job = load_job(ROOT / "specs" / "jobs" / f"{name}.plait")
        paper = estimate(job, pins)
        best = search(job).best
        gain = best.prediction.tokens_per_s / paper.prediction.tokens_per_s - 1
        ok = gain >= -1e-9
        all_ok &= ok
        t.add_row(name, paper.layout.short(), f"{paper.prediction.mfu:.1%}", best.layout.short(),
                  f"{best.prediction.mfu:.1%}", f"{gain:+.1%}", "yes" if ok else "NO")
    t.caption = "plait >= paper on every job" if all_ok else "plait below the paper's layout"
    Console(width=200).print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
