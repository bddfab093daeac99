"""Starting local ranks: torch.multiprocessing.spawn (a fresh interpreter per rank, importing
torch and plait again) against runtime/spawn.py's start_ranks (forked from a server that imported
them once), side by side in one run. Each start is a gloo init + teardown of RANKS ranks; the
first start_ranks call also starts the fork server and is shown on its own.

    .venv/bin/python benchmarks/rank_startup.py
"""
from __future__ import annotations

import statistics
import tempfile
import time

import torch.multiprocessing as mp
from rich.console import Console
from rich.table import Table

from plait.runtime.mesh import destroy, init_distributed, set_threads
from plait.runtime.spawn import start_ranks

RANKS, REPEAT = 4, 3


def _rank(rank: int, world: int, work: str) -> None:
    set_threads()
    init_distributed("gloo", 60, f"file://{work}/rendezvous", rank, world)
    destroy()


def _seconds(start) -> float:
    with tempfile.TemporaryDirectory() as work:
        t = time.perf_counter()
        start(work)
        return time.perf_counter() - t


def main() -> None:
    def spawned(work):
        mp.spawn(_rank, args=(RANKS, work), nprocs=RANKS, join=True)

    def forked(work):
        start_ranks(_rank, (RANKS, work), RANKS)

    first = _seconds(forked)  # starts the fork server
    spawn_s = statistics.median(_seconds(spawned) for _ in range(REPEAT))
    fork_s = statistics.median(_seconds(forked) for _ in range(REPEAT))
    table = Table(title=f"{RANKS} local gloo ranks: init + teardown, median of {REPEAT}")
    for col in ("start", "seconds", "vs spawn"):
        table.add_column(col, justify="right" if col != "start" else "left")
    table.add_row("torch.multiprocessing.spawn", f"{spawn_s:.2f}", "1.00x")
    table.add_row("start_ranks, fork server warm", f"{fork_s:.2f}", f"{spawn_s / fork_s:.1f}x faster")
    table.add_row("start_ranks, first call (starts the server)", f"{first:.2f}",
                  f"{spawn_s / first:.1f}x faster")
    Console().print(table)


if __name__ == "__main__":
    main()
