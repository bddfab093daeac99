"""Mamba2 scan on CPU: the SSD chunked algorithm against the sequential recurrence (the two agree to
rounding, tests/lowering/test_build_mamba.py), forward and forward+backward, one thread, fp32.
Shapes are one TP rank of a small hybrid layer: 8 heads of 64 channels, 2 groups, state 64,
chunk 64.

    .venv/bin/python benchmarks/ssd_scan.py
"""
from __future__ import annotations

import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from plait.lowering.modules import ssd

HEADS, HEAD_DIM, GROUPS, STATE, CHUNK = 8, 64, 2, 64, 64


def inputs(seq: int, grad: bool):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, seq, HEADS, HEAD_DIM, generator=gen)
    dt = torch.rand(1, seq, HEADS, generator=gen) * 0.1
    A = -torch.rand(HEADS, generator=gen) * 4
    B, C = (torch.randn(1, seq, GROUPS, STATE, generator=gen) for _ in range(2))
    return [t.requires_grad_(grad) for t in (x, dt, A, B, C)]


def timed(fn, repeats: int) -> float:
    """Best of ``repeats`` after a warm-up; a run over a second counts as its own measurement."""
    start = time.perf_counter()
    fn()
    best = time.perf_counter() - start
    for _ in range(repeats if best < 1.0 else 0):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def case(scan, seq: int, backward: bool) -> float:
    args = inputs(seq, backward)

    def run():
        y = scan(*args)
        if backward:
            y.square().sum().backward()
    return timed(run, 3)


def main() -> int:
    torch.set_num_threads(1)
    table = Table(title="SSD chunked scan vs sequential recurrence (CPU, 1 thread, fp32)")
    for col in ("seq", "pass", "sequential ms", "chunked ms", "speed-up"):
        table.add_column(col, justify="right")
    chunked = lambda *a: ssd.ssd_chunked(*a, CHUNK)  # noqa: E731
    for seq in (256, 1024, 2048):
        for backward in (False, True):
            t_seq = case(ssd.ssd_sequential, seq, backward)
            t_chunk = case(chunked, seq, backward)
            table.add_row(str(seq), "fwd+bwd" if backward else "fwd", f"{t_seq * 1e3:.1f}",
                          f"{t_chunk * 1e3:.1f}", f"{t_seq / t_chunk:.1f}x")
    Console(width=120).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
