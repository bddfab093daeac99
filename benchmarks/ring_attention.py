"""Context parallelism on CPU: forward+backward time per rank of CP2 (two gloo processes, one thread
each, zigzag halves of the sequence) against one rank holding the whole sequence, for causal ring
attention and for the Mamba2 conv + scan with state passing. Ideal ratio 0.5 (half the work per
rank); the excess is the ring / all-gather traffic and the per-chunk-pair overhead. fp32. On a
shared machine the CPU-time ratio (no waiting) is the steadier figure.

    .venv/bin/python benchmarks/ring_attention.py
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

from plait.lowering import collectives, cp_ops
from plait.lowering.cp_attention import ring_attention
from plait.lowering.mamba_cp import cp_causal_conv1d, cp_ssd_scan
from plait.lowering.modules.attention import causal_attention
from plait.lowering.modules.mamba import causal_conv1d, ssd_scan

HEADS, KV_HEADS, HEAD_DIM = 8, 2, 64
M_HEADS, M_DIM, GROUPS, STATE, CONV, CHUNK = 8, 64, 2, 64, 4, 64
SEQS = (2048, 4096)


def attention_inputs(seq: int):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(1, seq, HEADS, HEAD_DIM, generator=gen),
            torch.randn(1, seq, KV_HEADS, HEAD_DIM, generator=gen),
            torch.randn(1, seq, KV_HEADS, HEAD_DIM, generator=gen))


def mamba_inputs(seq: int):
    gen = torch.Generator().manual_seed(1)
    channels = M_HEADS * M_DIM + 2 * GROUPS * STATE
    return (torch.randn(1, seq, channels, generator=gen), torch.randn(channels, 1, CONV, generator=gen) * 0.3,
            torch.zeros(channels), torch.rand(1, seq, M_HEADS, generator=gen) * 0.1,
            -torch.rand(M_HEADS, generator=gen) * 4)


def mamba(xbc, w, b, dt, A, conv=causal_conv1d, scan=ssd_scan, **cp):
    xbc = conv(xbc, w, b, **cp)
    d = M_HEADS * M_DIM
    x = xbc[..., :d].reshape(*xbc.shape[:2], M_HEADS, M_DIM)
    B = xbc[..., d:d + GROUPS * STATE].reshape(*xbc.shape[:2], GROUPS, STATE)
    C = xbc[..., d + GROUPS * STATE:].reshape(*xbc.shape[:2], GROUPS, STATE)
    return scan(x, dt, A, B, C, CHUNK, **cp)


def fwd_bwd(fn, args, sync=lambda: None) -> tuple[float, float]:
    """(wall, cpu) seconds: best of 2 forward+backward runs after a warm-up, ranks started
    together. CPU time leaves out waiting (for the peer, or for a core on a busy machine)."""
    args = [a.clone().requires_grad_(a.is_floating_point()) for a in args]
    best = (float("inf"), float("inf"))
    for i in range(3):
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        fn(*args).square().sum().backward()
        if i:
            best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


def local_cases(seq: int, size: int, rank: int):
    shard = lambda t: cp_ops.zigzag_shard(t, size, rank, 1) if t.dim() > 1 and t.shape[1] == seq else t  # noqa: E731
    ring = lambda q, k, v: ring_attention(q, k, v, HEAD_DIM ** -0.5, "cp", size, rank)  # noqa: E731
    cp_mamba = lambda *a: mamba(*a, conv=cp_causal_conv1d, scan=cp_ssd_scan,  # noqa: E731
                                axis="cp", size=size, rank=rank)
    return {"ring attention": (ring, [shard(t) for t in attention_inputs(seq)]),
            "mamba conv+scan (state passing)": (cp_mamba, [shard(t) for t in mamba_inputs(seq)])}


def worker(rank: int, world: int, path: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    collectives.bind_axis("cp", dist.group.WORLD, tuple(range(world)))
    results = {}
    for seq in SEQS:
        for name, (fn, args) in local_cases(seq, world, rank).items():
            results[(name, seq)] = fwd_bwd(fn, args, dist.barrier)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def one_rank(name: str, seq: int) -> float:
    if name == "ring attention":
        return fwd_bwd(lambda q, k, v: causal_attention(q, k, v, HEAD_DIM ** -0.5), attention_inputs(seq))
    return fwd_bwd(mamba, mamba_inputs(seq))


def main() -> int:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(2, f"{tmp}/rdv", f"{tmp}/cp2.pt"), nprocs=2, join=True)
        cp2 = torch.load(f"{tmp}/cp2.pt")
    table = Table(title="CP2 per-rank time vs one rank (CPU, gloo, 1 thread per rank, fwd+bwd)")
    for col in ("op", "seq", "one rank ms", "CP2 rank ms", "wall ratio", "cpu ratio"):
        table.add_column(col, justify="left" if col == "op" else "right")
    for (name, seq), (wall_cp, cpu_cp) in cp2.items():
        wall_one, cpu_one = one_rank(name, seq)
        table.add_row(name, str(seq), f"{wall_one * 1e3:.1f}", f"{wall_cp * 1e3:.1f}",
                      f"{wall_cp / wall_one:.2f}", f"{cpu_cp / cpu_one:.2f}")
    Console(width=120).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
