"""What context parallelism costs a step on local gloo ranks: the same job and tokens per rank
under dp2 and under cp2, run in turns so that the machine's drifting speed hits both alike. Per
layout: the step (median of steps 3-9 on rank 0), its micro-batches' forward + backward, the ATen
calls of one step (torch.profiler on rank 0, step 6: where a block is host-bound its time follows
the calls, not the FLOPs), and with --calibration the cost model's step. The last column is cp2
over dp2 for the same tokens.

    .venv/bin/python benchmarks/cp_overhead.py tiny-hybrid-local --rounds 2 --calibration calib.json
    .venv/bin/python benchmarks/cp_overhead.py tiny-local

Measured 2026-12-03 on the idle 2-core VM with a calibration made minutes before
(benchmarks/predict_vs_measure.py's): tiny-hybrid-local dp2 0.325 / 0.330 s, cp2 1.169 / 1.272 s
(3.60x / 3.85x, 132,544 ATen calls per step against 29,672: 4.47x), predicted 0.274 and 1.063 s
(3.87x; without the CP host work `plait calibrate` now measures, 0.80 s for cp2: 2.9x); tiny-local
dp2 0.164 s, cp2 ring 0.422 s (2.57x, calls 3.78x), predicted 0.124 and 0.379 s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from plait.ir.dsl import load_job
from plait.ir.plan import Layout
from plait.runtime.harness.step_probe import local_rank, trainer_for
from plait.runtime.spawn import start_ranks
from plait.runtime.train import Trainer
from predict_vs_measure import job_file, predicted_step  # the same jobs and prediction

STEPS, PROFILED = 10, 6  # steps 3..9 timed; step 6 also profiled (its time left out)
LAYOUTS = {"dp2": Layout(dp=2, mbs=2, dp_kind="zero1"), "cp2": Layout(cp=2, mbs=2, dp_kind="zero1")}


def _aten_calls(trainer: Trainer, step: int) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.train_step(step, STEPS)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def _worker(rank: int, world: int, job_path: str, layout: str, work: str) -> None:
    with local_rank(rank, world, work):
        trainer = trainer_for(load_job(job_path), LAYOUTS[layout])
        steps, calls = [], 0
        for step in range(STEPS):
            if step == PROFILED and rank == 0:
                calls = _aten_calls(trainer, step)
                continue
            start = time.perf_counter()
            trainer.train_step(step, STEPS)
            if step >= 3:
                steps.append(time.perf_counter() - start)
        if rank == 0:
            Path(work, "out.json").write_text(json.dumps({
                "step": statistics.median(steps), "microbatches": trainer.plan.num_microbatches,
                "aten_calls": calls}))


def measure(job_path: str, layout: str) -> dict:
    with tempfile.TemporaryDirectory() as work:
        start_ranks(_worker, (2, job_path, layout, work), 2)
        return json.loads(Path(work, "out.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job", nargs="?", default="tiny-hybrid-local", help="a job of specs/jobs")
    ap.add_argument("--rounds", type=int, default=1, help="dp2 / cp2 turns")
    ap.add_argument("--calibration", help="a 2-rank `plait calibrate local-cpu` file: adds the "
                    "cost model's step")
    args = ap.parse_args()
    job_path = job_file(ap, args.job)
    t = Table(title=f"{args.job}: dp2 against cp2, the same tokens per rank (rank 0, medians of "
                    f"steps 3-{STEPS - 1})")
    for col in ("round", "layout", "micro-batches", "step s", "ATen calls per step",
                "predicted step s", "cp2 / dp2 step", "cp2 / dp2 calls"):
        t.add_column(col, justify="right")
    for r in range(args.rounds):
        dp = None
        for layout in LAYOUTS:
            got = measure(str(job_path), layout)
            dp = got if layout == "dp2" else dp
            p = predicted_step(args.job, LAYOUTS[layout], args.calibration)
            ratio = layout == "cp2"
            t.add_row(str(r), layout, str(got["microbatches"]), f"{got['step']:.4f}",
                      str(got["aten_calls"]), "-" if p is None else f"{p:.4f}",
                      f"{got['step'] / dp['step']:.2f}" if ratio else "",
                      f"{got['aten_calls'] / dp['aten_calls']:.2f}" if ratio else "")
    Console(width=160).print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
