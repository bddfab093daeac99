"""plait's runtime against PyTorch's own parallelism, layout by layout, in one run.

For each layout, every rank builds both programs of the same model (tiny-dense, same seed) and trains
them on the same global batches: plait's compiled program (`Trainer.train_step`) and PyTorch's own
implementation of the layout (torch_layouts.py: DTensor TP, torch.distributed.pipelining, DDP,
FSDP2). Steps alternate plait / torch / plait / torch ... so that the load of a shared machine
falls on both alike; each step is timed between two barriers of all ranks. Reported: the median
step time of each after warm-up, and the speed ratio torch time / plait time (1.0 = level, above 1 =
plait faster) as the median over adjacent step pairs, with its quartiles: on a machine whose load
drifts, a pair of neighbouring steps sees the same load, so the paired ratio is the steadier one. The step-0 losses of both are printed too (same model, same batch: they
agree to rounding).

    .venv/bin/python benchmarks/runtime_vs_torch.py [--steps 12] [--warmup 3] [--only NAME ...]

gloo on CPU, one torch thread per rank (the machine's cores are shared by all ranks).
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "specs" / "jobs" / "tiny-local.plait"
sys.path.insert(0, str(Path(__file__).resolve().parent))


@dataclass(frozen=True)
class Bench:
    """What each worker needs to know besides its cases: the setup and how many steps to time."""
    setup: object
    warmup: int
    steps: int


def cases(only: list[str] | None):
    from plait.commands.run import DEMO_LAYOUT, resolve_plan
    from plait.ir.dsl import load_job
    from plait.ir.plan import Layout
    from plait.runtime.harness.parity import Case

    job = load_job(str(JOB))
    demo, auto = resolve_plan(job, None, DEMO_LAYOUT), resolve_plan(job, None, None)
    gb = job.global_batch
    out = [
        Case("dp2 replicated vs DDP", Layout(dp=2, mbs=gb // 2, dp_kind="replicated")),
        Case("dp2 fsdp vs FSDP2", Layout(dp=2, mbs=gb // 2, dp_kind="fsdp")),
        Case("tp2 sp vs DTensor TP+SP", Layout(tp=2, mbs=gb, sp=True, dp_kind="replicated")),
        Case("tp2 vs DTensor TP", Layout(tp=2, mbs=gb, dp_kind="replicated")),
        Case("pp2 1f1b vs pipelining", Layout(pp=2, mbs=gb // 4, dp_kind="replicated")),
        Case("dp2 zero1 vs DDP+ZeroRedundancyOptimizer", Layout(dp=2, mbs=gb // 2, dp_kind="zero1")),
        Case(f"demo {demo.layout.short()} {demo.layout.dp_kind}{' sp' if demo.layout.sp else ''}"
             + (" (torch: FSDP2)" if demo.layout.dp_kind == "zero1" else ""),
             demo.layout, demo.stages, demo.schedule),
        Case(f"auto {auto.layout.short()} {auto.layout.dp_kind}", auto.layout, auto.stages,
             auto.schedule),
    ]
    return job, [c for c in out if not only or any(o in c.name for o in only)]


def _time(fn) -> tuple[float, float]:
    dist.barrier()
    start = time.perf_counter()
    loss = fn()
    dist.barrier()
    return time.perf_counter() - start, loss


def _run_case(bench: Bench, case, rank: int, out_dir: Path) -> None:
    from torch_layouts import TorchLayout

    from plait.lowering.build import build_model
    from plait.runtime.mesh import build_mesh
    from plait.runtime.train import Trainer

    setup = bench.setup
    plan = setup.plan(case)
    mesh = build_mesh(plan.layout, 120)
    trainer = Trainer(setup.job(mesh.world), plan, mesh, source=setup.source())
    from plait.planner.layouts import units

    ours = TorchLayout(build_model(setup.spec, seed=setup.seed), plan, setup.optimizer, rank,
                       unit_size=len(units(setup.spec)[0]))
    total = bench.warmup + bench.steps
    times: dict[str, list[float]] = {"plait": [], "torch": []}
    losses = {}
    for step in range(total):
        batch = trainer.loader.local_batch(step)  # the same rank coordinates on both sides
        runs = [("plait", lambda: trainer.train_step(step, total).loss),
                ("torch", lambda: ours.step(batch.tokens, batch.labels))]
        for name, fn in runs[:: 1 if step % 2 else -1]:  # A B, B A, ...
            elapsed, loss = _time(fn)
            times[name].append(elapsed)
            losses.setdefault(name, loss)
    torch.save({"times": {k: v[bench.warmup:] for k, v in times.items()}, "losses": losses},
               out_dir / f"{case.name}.rank{rank}.pt")
    dist.barrier()


def _worker(rank: int, world: int, bench: Bench, group, out_dir: str) -> None:
    from plait.runtime.mesh import destroy, init_distributed

    torch.set_num_threads(1)
    # DTensor's note that a 2-D norm reduction takes two all-reduces (torch's clip under FSDP+TP)
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    init_distributed("gloo", 120, f"file://{out_dir}/rendezvous", rank, world)
    try:
        for case in group:
            _run_case(bench, case, rank, Path(out_dir))
    finally:
        destroy()


def main(argv=None) -> int:
    from rich.console import Console
    from rich.table import Table

    from plait.runtime.harness.parity import Setup, spawn_cases

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="run the cases whose name contains one of these")
    args = parser.parse_args(argv)
    job, chosen = cases(args.only)
    setup = Setup(spec=job.model, global_batch=job.global_batch, seq=job.seq_len, steps=1,
                  optimizer=job.optimizer, seed=job.seed)
    load_before = os.getloadavg()
    records = spawn_cases(_worker, chosen, None, Bench(setup, args.warmup, args.steps))
    load_after = os.getloadavg()
    table = Table(title=f"plait vs PyTorch's own parallelism (CPU gloo, fp32, {job.model.name}, "
                        f"batch {job.global_batch} x {job.seq_len}, median of {args.steps} steps)")
    for col in ("layout (plait vs torch)", "ranks", "plait ms/step", "torch ms/step",
                "plait / torch speed", "quartiles", "step-0 loss plait / torch"):
        table.add_column(col)
    for case in chosen:
        rank0 = records[case.name][0]
        ms = {k: statistics.median(v) * 1e3 for k, v in rank0["times"].items()}
        paired = [t / p for p, t in zip(rank0["times"]["plait"], rank0["times"]["torch"])]
        q1, q2, q3 = statistics.quantiles(paired, n=4)
        last = rank0["losses"]  # both: averaged over DP, from the last stage, on every rank
        table.add_row(case.name, str(case.layout.world), f"{ms['plait']:.0f}", f"{ms['torch']:.0f}",
                      f"{q2:.2f}x", f"{q1:.2f} - {q3:.2f}",
                      f"{last['plait']:.5f} / {last['torch']:.5f}")
    Console(width=160).print(table)
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f} "
          f"on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
