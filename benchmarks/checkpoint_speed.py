"""Checkpoint cost: training step time with no checkpoints, synchronous saves and asynchronous
saves (`plait run --async-save`), one rank on the CPU, the same steps and data in each mode.

A synchronous save stops training while every byte is written and hashed; an asynchronous one
stops it only to copy the state to CPU memory (and, at the next save, to wait for the previous
one and write its manifest), the files being written by a background thread.

    .venv/bin/python benchmarks/checkpoint_speed.py [--steps 12] [--every 2] [--hidden 384]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from plait.ir.model import MLP, Attention, ModelSpec, Rope
from plait.ir.plan import Layout
from plait.runtime import checkpoint
from plait.runtime import mesh as mesh_mod
from plait.runtime.mesh import build_mesh
from plait.runtime.harness.parity import TIMEOUT_S, Case, Setup
from plait.runtime.train import Trainer


def _trainer(setup: Setup) -> Trainer:
    plan = Case("bench", Layout()).plan(setup.spec, setup.global_batch, setup.seq)
    return Trainer(setup.job(1), plan, build_mesh(plan.layout, TIMEOUT_S), source=setup.source())


def run_mode(setup: Setup, mode: str, every: int, root: Path) -> dict:
    """Train ``setup.steps`` steps; returns per-step wall times (save time included)."""
    trainer = _trainer(setup)
    root.mkdir(parents=True, exist_ok=True)
    saver = checkpoint.Saver(str(root / mode), every, asynchronous=mode == "async") \
        if mode != "none" else None
    times = []
    for step in range(setup.steps):
        start = time.perf_counter()
        trainer.train_step(step, setup.steps)
        if saver:
            saver(trainer, step + 1, setup.steps)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    if saver:
        saver.close()  # the last asynchronous save completes: its cost counts too
    tail = time.perf_counter() - start
    size = sum(f.stat().st_size for f in (root / mode).rglob("*") if f.is_file()) if saver else 0
    return {"times": times, "total": sum(times) + tail, "bytes": size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=3,
                        help="each mode runs once per round, in rotated order (medians reported)")
    args = parser.parse_args(argv)
    h = args.hidden
    spec = ModelSpec(name="ckpt-bench", vocab=4096, hidden=h, layers=("attention", "mlp") * 2,
                     attention=Attention(heads=h // 64, kv_heads=h // 64, head_dim=64, rope=Rope()),
                     mlp=MLP(ffn=4 * h))
    setup = Setup(spec, global_batch=4, seq=64, steps=args.steps)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="plait-ckpt-bench-") as tmp:
        mesh_mod.init_distributed("gloo", 120, f"file://{tmp}/rdzv", 0, 1)
        try:
            results = _rounds(setup, args, Path(tmp))
        finally:
            mesh_mod.destroy()
    _print(results, args)
    return 0


MODES = ("none", "sync", "async")


def _rounds(setup: Setup, args, tmp: Path) -> dict:
    """Median per mode over rounds that rotate the order (a busy machine's load drifts)."""
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES[r % 3:] + MODES[:r % 3]:
            runs[mode].append(run_mode(setup, mode, args.every, tmp / f"round{r}"))
    return {m: sorted(rs, key=lambda x: x["total"])[len(rs) // 2] for m, rs in runs.items()}


def _print(results: dict, args) -> None:
    saves = args.steps // args.every
    base = results["none"]
    mib = results["sync"]["bytes"] / saves / 2**20
    table = Table(title=f"checkpoint cost (CPU, 1 rank, {args.steps} steps, {saves} saves of "
                        f"{mib:.1f} MiB, median of {args.rounds} rounds)")
    for col in ("mode", "median step ms", "total s", "cost per save ms", "total vs none",
                "cost vs sync"):
        table.add_column(col, justify="right")
    sync_cost = (results["sync"]["total"] - base["total"]) / saves
    for mode, r in results.items():
        cost = (r["total"] - base["total"]) / saves if mode != "none" else 0.0
        table.add_row(mode, f"{1e3 * statistics.median(r['times']):.1f}", f"{r['total']:.2f}",
                      f"{1e3 * cost:.1f}" if mode != "none" else "-",
                      f"{r['total'] / base['total']:.2f}x",
                      f"{cost / sync_cost:.2f}x" if mode != "none" and sync_cost > 0 else "-")
    Console(width=140).print(table)


if __name__ == "__main__":
    sys.exit(main())
