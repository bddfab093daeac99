"""torch AdamW's three implementations side by side, each after the runtime's global-norm clip
(runtime/optim.py: each gradient's squared norm, then every gradient times the clip factor), on one
rank's thread (runtime/mesh.py set_threads): seconds per step and parameter, and the bytes per
parameter that implies at this machine's copy bandwidth measured in the same run, next to the
count ir/counts/optimizer.py prices (ADAMW_STEP_BYTES + CLIP_BYTES). Paths run in turns, so the
machine's drift hits all alike.

    nice .venv/bin/python benchmarks/adamw_paths.py --rounds 5

A parameter set whose state (parameter, gradient, two moments: 16 bytes per parameter) fits in
the caches moves fewer bytes through memory than the count, so its implied bytes come out low;
the large set is the one to read against the count.

Measured 2026-12-03 on the 2-core VM (load 3.3 -> 2.9, copy 19.4 GB/s), ns per parameter
single-tensor / foreach / fused: tiny-local 4.97 / 4.32 / 1.64 (fused 3.0x), large 5.84 / 5.59 /
1.21 (fused 4.8x); implied bytes 96 / 84 / 32 and 113 / 108 / 23 against 92 / 92 / 40 counted.
A copy's "8 bytes" per element are 12 through DRAM on this CPU (the destination's lines are read
before they are written), while the fused kernel writes back lines it has just read: in DRAM bytes
its 23 are ~35 of the 40 counted. The single-tensor loop's temporaries (sqrt, division) cost more
than their bytes. Note that `plait calibrate` prices memory-bound work on the CPU at plait's eager
norm / activation rate (~10 GB/s here), not a copy's, so the cost model charges this step 2.5-3x
what it takes on the CPU (GPUs: hbm_eff is the copy's).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from plait.ir import counts
from plait.ir.dsl import load_job
from plait.runtime.mesh import set_threads
from plait.runtime.optim import clip_coefficient, param_groups, scale, squared_norm

ROOT = Path(__file__).resolve().parents[1]
PATHS = {"single-tensor": {"foreach": False}, "foreach": {"foreach": True},
         "fused": {"fused": True}}
STEPS = 5  # timed steps per path and round


def tiny_local_params() -> list[tuple[str, torch.Tensor]]:
    """The tiny-local job's model parameters (tiny-dense, 0.8 M)."""
    from plait.lowering.build import build_model

    job = load_job(ROOT / "specs" / "jobs" / "tiny-local.plait")
    return [(n, p.detach()) for n, p in build_model(job.model, seed=0).named_parameters()]


def large_params() -> list[tuple[str, torch.Tensor]]:
    """16 M parameters (state 256 MiB: past any cache): 16 matrices 1024 x 1024 and their norms."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(16):
        out += [(f"w{i}", torch.randn(1024, 1024, generator=g) * 0.02), (f"n{i}", torch.ones(1024))]
    return out


def copy_bandwidth(numel: int = 1 << 25) -> float:
    """Bytes per second of a large fp32 copy (read + write), the best of 5."""
    src, dst = torch.randn(numel), torch.empty(numel)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 8 * numel / best


class Stepper:
    """One path's optimizer over its own copy of the parameters, stepped as the runtime steps."""

    def __init__(self, named: list[tuple[str, torch.Tensor]], kind: dict):
        self.params = [torch.nn.Parameter(p.clone()) for _, p in named]
        g = torch.Generator().manual_seed(1)
        for p in self.params:
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        self.opt = torch.optim.AdamW(param_groups(zip((n for n, _ in named), self.params), 0.1),
                                     lr=1e-3, **kind)
        self.step()  # the state exists before timing

    def step(self) -> None:
        grads = [p.grad for p in self.params]
        norm = torch.stack([squared_norm(g, g.dtype) for g in grads]).sum().sqrt()
        scale(grads, clip_coefficient(norm, 1.0))
        self.opt.step()

    def seconds(self) -> float:
        start = time.perf_counter()
        for _ in range(STEPS):
            self.step()
        return (time.perf_counter() - start) / STEPS


def measure(named, rounds: int) -> dict[str, float]:
    steppers = {k: Stepper(named, kind) for k, kind in PATHS.items()}
    times: dict[str, list[float]] = {k: [] for k in PATHS}
    for _ in range(rounds):
        for k, s in steppers.items():
            times[k].append(s.seconds())
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="turns over the three paths")
    args = ap.parse_args()
    set_threads()
    bandwidth = copy_bandwidth()
    t = Table(title=f"clip + AdamW step, {torch.get_num_threads()} thread(s), copy bandwidth "
                    f"{bandwidth / 1e9:.1f} GB/s (medians of {args.rounds} turns x {STEPS} steps)")
    for col in ("parameters", "path", "ms per step", "ns per parameter", "x single-tensor",
                "implied bytes / param", "counted bytes / param"):
        t.add_column(col, justify="right")
    for label, named in (("tiny-local", tiny_local_params()), ("large", large_params())):
        n = sum(p.numel() for _, p in named)
        got = measure(named, args.rounds)
        for k, s in got.items():
            counted = counts.ADAMW_STEP_BYTES[k] + counts.CLIP_BYTES
            t.add_row(f"{label} {n / 1e6:.2f} M", k, f"{s * 1e3:.2f}", f"{s / n * 1e9:.2f}",
                      f"{got['single-tensor'] / s:.2f}", f"{s * bandwidth / n:.0f}", str(counted))
    Console(width=160).print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
