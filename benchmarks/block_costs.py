"""Each block kind of a tiny job, measured against the cost model on one rank: forward + backward
of the real block (plait's lowering's module, norm, mixer and residual) on one micro-batch, median
and fastest of 15 after 3 warm-ups, one thread, next to the cost model's unit of that one kind
(planner/cost/pipeline.py build_unit: compute, host work, no communication on one rank), with the
calibration given. Where a kind's prediction misses, this says which.

    .venv/bin/python benchmarks/block_costs.py tiny-hybrid-local --calibration calib.json

Measured 2026-12-03 on the idle 2-core VM with a 2-rank calibration (scan_bwd_ratio 0.70):
tiny-hybrid-local mamba 13.06 ms (fastest 12.82) against 12.77 predicted, mlp 1.86 against 1.94,
attention 2.99 against 3.22; the same calibration with scan_bwd_ratio set to 1 (the scan's
backward at BWD_CORE x its forward, as before it was measured): mamba 12.39 ms against 11.47.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from plait.ir.plan import Layout
from plait.lowering.build import build_model
from plait.planner import calibration
from plait.planner.cost.context import Context
from plait.planner.cost.pipeline import build_unit
from predict_vs_measure import job_file, local_job  # the same jobs, on one local rank

LAYOUT = Layout(mbs=2, dp_kind="zero1")


def block_seconds(layer, x: torch.Tensor, repeat: int = 15) -> tuple[float, float]:
    """(median, fastest) seconds of one forward + backward of ``layer`` on ``x``."""
    for _ in range(3):
        layer(x).sum().backward()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        layer(x).sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job", help="a job of specs/jobs, e.g. tiny-hybrid-local")
    ap.add_argument("--calibration", required=True, help="a `plait calibrate local-cpu` file")
    args = ap.parse_args()
    job_file(ap, args.job)
    torch.set_num_threads(1)
    job = local_job(args.job, 1, calibration.read(args.calibration))
    ctx, model = Context(job, LAYOUT), build_model(job.model)
    x = torch.randn(LAYOUT.mbs, job.seq_len, job.model.hidden, requires_grad=True)
    t = Table(title=f"{args.job}: one block's forward + backward on {LAYOUT.mbs} x {job.seq_len} "
                    "tokens, one rank")
    for col in ("kind", "measured ms", "fastest ms", "predicted ms", "predicted / measured"):
        t.add_column(col, justify="left" if col == "kind" else "right")
    seen = set()
    for kind, layer in zip(job.model.layers, model.layers):
        if kind in seen:
            continue
        seen.add(kind)
        median, fastest = block_seconds(layer, x)
        unit = build_unit(ctx, (kind,))
        predicted = unit.fwd + unit.bwd[0]
        t.add_row(kind, f"{median * 1e3:.2f}", f"{fastest * 1e3:.2f}", f"{predicted * 1e3:.2f}",
                  f"{predicted / median:.2f}")
    Console(width=120).print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
