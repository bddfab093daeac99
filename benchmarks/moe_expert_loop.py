"""The routed experts' loop path (lowering/modules/experts.py grouped_linear where
torch._grouped_mm does not run: the CPU, and any device whose build lacks it) with each expert's
weight taken by indexing (``w[e]``, before) and by one ``unbind`` (now), forward + backward of one
expert linear on one rank's thread, the two in turns so the machine's drift hits both alike.

Indexing's backward writes every expert's gradient into a zeroed copy of the whole [E, out, in]
weight: E full-size fills and adds a pass, quadratic in the local experts. unbind's backward stacks
the E gradients once. The gradients are bit-identical (tests/lowering/test_experts.py).

    nice .venv/bin/python benchmarks/moe_expert_loop.py --rounds 5
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from plait.lowering.modules.experts import grouped_linear

# (local experts, out, in, tokens): tiny-moe's layouts (8 experts of 2 x 128 / 2 x 64 rows at
# etp1 / etp2, 4 at ep2), and a fine-grained layer (64 local experts, Qwen2-57B-A14B's count)
SHAPES = ((4, 256, 128, 512), (8, 256, 128, 512), (8, 128, 128, 512), (64, 64, 64, 1024))


def indexed(x: torch.Tensor, counts: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The loop as it was: each expert's weight by indexing."""
    pieces = torch.split(x, counts.tolist())
    return torch.cat([F.linear(piece, w[e]) for e, piece in enumerate(pieces)])


def seconds(fn, x, counts, w, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        w.grad = x.grad = None
        start = time.perf_counter()
        fn(x, counts, w).sum().backward()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)  # one rank's thread (runtime/mesh.py set_threads)
    table = Table(title="routed experts' loop: forward + backward of one expert linear, ms "
                        "(median over rounds of the fastest repeat)")
    for col in ("experts", "out x in", "tokens", "w[e]", "unbind", "w[e] / unbind"):
        table.add_column(escape(col), justify="right")
    for experts, out, inp, tokens in SHAPES:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(experts, out, inp, generator=gen, requires_grad=True)
        x = torch.randn(tokens, inp, generator=gen, requires_grad=True)
        counts = torch.full((experts,), tokens // experts)
        old, new = [], []
        for _ in range(args.rounds):
            old.append(seconds(indexed, x, counts, w, args.repeat))
            new.append(seconds(grouped_linear, x, counts, w, args.repeat))
        a, b = statistics.median(old), statistics.median(new)
        table.add_row(str(experts), f"{out} x {inp}", str(tokens), f"{a * 1e3:.3f}",
                      f"{b * 1e3:.3f}", f"{a / b:.2f}x")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
