"""Sliding-window ring attention on CPU: forward+backward per rank of CP4 (four gloo processes, one
thread each, zigzag chunks of seq / 8 tokens) with a window of one chunk against full causal ring
attention, side by side in one run. The window leaves 2 of the 3 K/V exchanges (ir/counts
ring_steps) and 3 or 4 of the 9 chunk pairs per rank (two of them banded: PyTorch's CPU flash
kernel with a mask). fp32. On a shared machine the CPU-time figures (no waiting) are the steadier
ones; measured 2026-12-02 on 2 shared cores: cpu ratio 0.46, wall ratio 0.38.

    .venv/bin/python benchmarks/window_ring.py
"""
from __future__ import annotations

import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console
from rich.table import Table

from plait.ir.counts import ring_steps
from plait.lowering import collectives, cp_ops
from plait.lowering.cp_attention import chunk_pairs, ring_attention

HEADS, KV_HEADS, HEAD_DIM, CP = 8, 2, 64, 4
SEQ = 8192
WINDOWS = (None, SEQ // (2 * CP))  # full causal; one zigzag chunk


def inputs(rank: int):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, SEQ, h, HEAD_DIM, generator=gen) for h in (HEADS, KV_HEADS, KV_HEADS))
    return [cp_ops.zigzag_shard(t, CP, rank).requires_grad_() for t in (q, k, v)]


def fwd_bwd(window, rank: int) -> tuple[float, float]:
    """(wall, cpu) seconds: best of 2 forward+backward runs after a warm-up, ranks started together."""
    best = (float("inf"), float("inf"))
    for i in range(3):
        q, k, v = inputs(rank)
        dist.barrier()
        wall, cpu = time.perf_counter(), time.process_time()
        ring_attention(q, k, v, HEAD_DIM ** -0.5, "cp", CP, rank, window).square().sum().backward()
        if i:
            best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


def worker(rank: int, world: int, path: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    collectives.bind_axis("cp", dist.group.WORLD, tuple(range(world)))
    results = {w: fwd_bwd(w, rank) for w in WINDOWS}
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(CP, f"{tmp}/rdv", f"{tmp}/out.pt"), nprocs=CP, join=True)
        ranks = torch.load(f"{tmp}/out.pt", weights_only=True)  # plain floats: no pickled code
    chunk = SEQ // (2 * CP)
    table = Table(title=f"CP{CP} ring attention, seq {SEQ}, fwd+bwd, slowest rank (CPU, gloo, 1 thread per rank)")
    for col in ("window", "K/V exchanges", "chunk pairs, rank 0", "wall ms", "cpu ms", "wall ratio", "cpu ratio"):
        table.add_column(col, justify="right")
    base = None
    for w in WINDOWS:
        wall, cpu = (max(r[w][i] for r in ranks) for i in (0, 1))
        base = base or (wall, cpu)
        pairs = sum(len(chunk_pairs(CP, 0, s, chunk, w)) for s in range(CP))
        table.add_row("none" if w is None else str(w), str(len(ring_steps(CP, SEQ, w)) - 1), str(pairs),
                      f"{wall * 1e3:.0f}", f"{cpu * 1e3:.0f}", f"{wall / base[0]:.2f}", f"{cpu / base[1]:.2f}")
    Console(width=120).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
