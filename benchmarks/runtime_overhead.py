"""Runtime overhead: what lowering adds to the reference module, and the demo's per-rank step time.

1. The single-rank compiled program (trace -> all passes -> split into stage + loss children) against
   the reference module it came from: forward + backward of the same batch, timed side by side in
   alternating repetitions on one thread; the ratio of medians (target <= 1.05).
2. The 8-rank demo layout (tiny-local, planned with tp=2 pp=2) trained for a few steps with
   torchrun + gloo on the bundled corpus: median step time and tokens/s from rank 0's log.

    .venv/bin/python benchmarks/runtime_overhead.py [--reps 30] [--steps 8]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "specs" / "jobs" / "tiny-local.plait"


def _fwd_bwd(fn, tokens, labels) -> float:
    start = time.perf_counter()
    fn(tokens, labels).backward()
    return time.perf_counter() - start


def single_rank(reps: int) -> dict:
    from plait.ir.dsl import load_job
    from plait.ir.plan import Layout
    from plait.lowering.build import build_model
    from plait.lowering.compile import lower
    from plait.runtime.launch import hand_plan

    torch.set_num_threads(1)
    job = load_job(str(JOB))
    batch, seq = 4, job.seq_len
    plan = replace(hand_plan(replace(job, global_batch=batch), Layout(mbs=batch)), world=1)
    reference = build_model(job.model, seed=0)
    program = lower(build_model(job.model, seed=0), job.model, plan, 0)
    tokens = torch.randint(0, job.model.vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(tokens, -1, 1)
    compiled = lambda t, l: program.loss(program.stage(0)(t), l)  # noqa: E731
    assert torch.equal(reference(tokens, labels), compiled(tokens, labels))
    times = {"reference": [], "compiled": []}
    for _ in range(3):  # warm-up
        _fwd_bwd(reference, tokens, labels), _fwd_bwd(compiled, tokens, labels)
    for i in range(reps):
        order = [("reference", reference), ("compiled", compiled)][:: 1 if i % 2 else -1]
        for name, fn in order:
            times[name].append(_fwd_bwd(fn, tokens, labels))
    ref, comp = statistics.median(times["reference"]), statistics.median(times["compiled"])
    return {"reference_ms": ref * 1e3, "compiled_ms": comp * 1e3, "ratio": comp / ref,
            "tokens": batch * seq}


def demo_layout(steps: int) -> dict:
    from plait.commands.run import DEMO_LAYOUT, resolve_plan
    from plait.ir.dsl import load_job
    from plait.runtime.launch import launch_local, resolve_data

    job = load_job(str(JOB))
    job = replace(job, data=replace(job.data, synthetic=False, path=None))
    plan = resolve_plan(job, None, DEMO_LAYOUT)
    with tempfile.TemporaryDirectory() as tmp:
        job = resolve_data(job, Path(tmp))
        status = launch_local(job, plan, Path(tmp) / "run", steps=steps, quiet=True)
        if status != 0:
            raise SystemExit(f"demo layout run failed with status {status}")
        log = json.loads((Path(tmp) / "run" / "log.json").read_text())
    settled = [entry["step_time"] for entry in log[1:]]  # step 0 includes one-time setup
    step = statistics.median(settled)
    return {"layout": plan.layout.short() + f" {plan.layout.dp_kind}" + (" sp" if plan.layout.sp else ""),
            "step_s": step, "tokens_per_s": plan.global_batch * plan.seq_len / step,
            "peak_mb": max(entry["peak_memory_mb"] for entry in log)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)
    one = single_rank(args.reps)
    eight = demo_layout(args.steps)
    table = Table(title="runtime overhead (CPU, fp32, tiny-dense, seq 128)")
    for col in ("measurement", "reference", "compiled / distributed", "ratio / rate"):
        table.add_column(col)
    table.add_row(f"1 rank fwd+bwd, {one['tokens']} tokens (median of {args.reps})",
                  f"{one['reference_ms']:.2f} ms", f"{one['compiled_ms']:.2f} ms",
                  f"{one['ratio']:.3f} (target <= 1.05)")
    table.add_row(f"8 ranks, {eight['layout']}: step (median of {args.steps - 1})", "",
                  f"{eight['step_s'] * 1e3:.0f} ms per rank",
                  f"{eight['tokens_per_s']:,.0f} tok/s, peak {eight['peak_mb']:.0f} MB/rank")
    Console(width=140).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
