"""Where a training step's time goes on local gloo ranks, one rank against two (dp2 ZeRO-1), run in
turns so that the machine's drifting speed hits both alike: per micro-batch forward + backward
(StepRunner.run over the rank's micro-batches), the end-of-step work (DataParallel.finish_step:
gradient reduction, global-norm clip, AdamW) and the whole step, medians of steps 3-11 on rank 0.
The last column is the two-rank micro-batch over the one-rank one: 1.00 when two ranks on two
cores run side by side at full speed. With --calibration, the cost model's step next to each.

    .venv/bin/python benchmarks/step_phases.py tiny-hybrid-local --rounds 2
    .venv/bin/python benchmarks/step_phases.py tiny-local --calibration calib.json

Measured 2026-12-03 on the 2-core VM, idle, each command twice (--rounds 2), with the
calibrations benchmarks/predict_vs_measure.py had made twenty minutes before:
  tiny-hybrid-local  1 rank 102 / 96 ms per micro-batch, 2 ranks 99 / 82 ms (0.96x, 0.86x); step
                     0.840 / 0.776 s and 0.449 / 0.440 s against 0.864 and 0.455 s predicted
  tiny-local         1 rank 30 / 31 ms, 2 ranks 32 / 32 ms (1.08x, 1.03x); step 0.257 / 0.264 s and
                     0.171 / 0.155 s against 0.320 and 0.189 s predicted (the machine ran faster
                     than when it was calibrated)
An earlier throwaway timing of the same phases had found the hybrid's 2-rank micro-batches
1.2-1.4x slower; these turns did not reproduce it.

torch's single-tensor AdamW (foreach=False, 92 bytes per parameter with the clip) against the fused
kernel the runtime steps now (ir/counts/optimizer.py adamw_path: 40), tiny-local --rounds 2 four
times in one sitting, after / before / after / before (before: main's runtime/optim.py, zero1.py,
checkpoint.py checked out; 2026-12-03, load average 6.7 falling to 4.2 from other jobs): end of
step on 1 rank 13.4 / 8.4 / 11.6 / 12.9 ms before, 5.1 / 5.0 / 5.8 / 6.3 ms after (medians 12.2 ->
5.4 ms, 2.3x; the rest of it is ZeRO-1's flat copies); on 2 ranks 30.8 / 19.0 / 18.2 / 17.0 ms
before, 22.7 / 24.9 / 18.3 / 19.8 after: the collectives and the ranks' skew on 2 shared cores
hide the optimizer's 0.4 M parameters per rank. benchmarks/adamw_paths.py times the three AdamW
paths alone.

fp32 ZeRO-1 accumulating into its flat gradient buffers (stop 27, as bf16 already did) instead of
flattening the gradients every step, tiny-hybrid-local --rounds 1 twice, before / after in turns
(before: a clone of main at 1048ee4): end of step on 1 rank 3.8 / 3.4 -> 2.9 / 2.8 ms, on 2 ranks
18.0 / 17.1 -> 15.2 / 14.7 ms; per micro-batch 72-80 ms either way.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from plait.ir.dsl import load_job
from plait.ir.plan import Layout
from plait.runtime.harness.step_probe import local_rank, trainer_for
from plait.runtime.spawn import start_ranks
from predict_vs_measure import job_file, predicted_step  # the same jobs and prediction

STEPS = 12  # steps 3..11 are timed
LAYOUTS = {1: Layout(mbs=2, dp_kind="zero1"), 2: Layout(dp=2, mbs=2, dp_kind="zero1")}


def _timing(obj, name: str, into: dict) -> None:
    """Wrap ``obj.name`` so each call's seconds are appended to ``into[name]``."""
    fn = getattr(obj, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        into.setdefault(name, []).append(time.perf_counter() - start)
        return out
    setattr(obj, name, timed)


def _worker(rank: int, world: int, job_path: str, work: str) -> None:
    with local_rank(rank, world, work):
        trainer = trainer_for(load_job(job_path), LAYOUTS[world])
        phases: dict = {}
        _timing(trainer.runner, "run", phases)
        _timing(trainer.dp, "finish_step", phases)
        steps = []
        for step in range(STEPS):
            if step == 3:
                phases.clear()
            start = time.perf_counter()
            trainer.train_step(step, STEPS)
            if step >= 3:
                steps.append(time.perf_counter() - start)
        if rank == 0:
            (Path(work) / "out.json").write_text(json.dumps({
                "step": statistics.median(steps), "microbatches": trainer.plan.num_microbatches,
                "run": statistics.median(phases["run"]),
                "finish": statistics.median(phases["finish_step"])}))


def measure(job_path: str, world: int) -> dict:
    with tempfile.TemporaryDirectory() as work:
        start_ranks(_worker, (world, job_path, work), world)
        return json.loads((Path(work) / "out.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job", help="a job of specs/jobs, e.g. tiny-local")
    ap.add_argument("--rounds", type=int, default=1, help="one-rank / two-rank turns")
    ap.add_argument("--calibration", help="a `plait calibrate local-cpu` file: adds the "
                    "cost model's step")
    args = ap.parse_args()
    job_path = job_file(ap, args.job)
    t = Table(title=f"{args.job}: step phases, rank 0 (medians of steps 3-{STEPS - 1})")
    for col in ("round", "ranks", "step s", "per micro-batch ms", "end of step ms",
                "predicted step s", "2 ranks / 1 rank per micro-batch"):
        t.add_column(col, justify="right")
    for r in range(args.rounds):
        single = None
        for world in (1, 2):
            got = measure(str(job_path), world)
            per = got["run"] / got["microbatches"]
            single = per if world == 1 else single
            p = predicted_step(args.job, LAYOUTS[world], args.calibration)
            t.add_row(str(r), str(world), f"{got['step']:.4f}", f"{per * 1e3:.1f}",
                      f"{got['finish'] * 1e3:.1f}", "-" if p is None else f"{p:.4f}",
                      f"{per / single:.2f}" if world == 2 else "")
    Console(width=160).print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
