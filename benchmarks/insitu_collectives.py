"""A small collective issued the way training issues it (plait's ops between slices of decoder
compute, every group of the node at once) against the same op back to back (issue #17):
runtime/calibrate_insitu.py on 2 and 4 local gloo ranks.

    .venv/bin/python benchmarks/insitu_collectives.py [--ranks 2 4]

Measured (2026-12-03, 2-core VM; "adds": what a call adds to the step; bare: back to back):
  slices of an attention + MLP pair on 64 tokens (8.5-23 ms), load 1.3-1.5:
    2 ranks   all-reduce 16 KiB adds 3.63 ms (bare 1.53), all-gather 32 KiB adds 2.69 (1.48)
    4 ranks   (two pairs at once) all-reduce adds 5.82 ms (bare 2.30), all-gather 4.93 (1.75)
  slices of the MLP block on 16 tokens (1.3-2.9 ms, what `plait calibrate` now runs), load 3:
    2 ranks   all-reduce 4 KiB adds 2.72 ms (bare 1.82), all-gather 8 KiB adds 2.16 (1.18)
    4 ranks   all-reduce adds 3.93 ms (bare 3.06), all-gather 2.98 (2.13)
against 0.68 ms per latency term from the alpha-beta fit of the fastest bare calls. tiny-local
tp2 sp issues 307 collective calls per step (benchmarks/count_collectives.py): 307 x ~1.5 ms of
in-situ cost beyond the bare fit = 0.46 s, the 0.48 s the bare-calibrated prediction missed
(0.567 s predicted, 1.047 s measured, same load).
With the CP ring's exchange added (p2p: lowering/cp_ops.py PeerExchange, a K and a V block sent to
the next rank and received from the previous, waited for; 2026-12-03, 2 ranks, load 3.5, two
runs): p2p 8 KiB adds 2.25 / 2.24 ms (bare 1.39 / 1.04), all-reduce 4 KiB 2.11 / 1.91 (1.41 /
1.26), all-gather 8 KiB 1.46 / 1.63 (1.46 / 1.01); at load 1.2 p2p 2.11 / 1.55, all-reduce
1.92 / 1.84, all-gather 0.99 / 1.52. `plait calibrate` keeps each op's own latency
(intra_latency_us_all_reduce / _all_gather / _p2p).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist




from plait.runtime.calibrate_insitu import measure_insitu  # noqa: E402
from plait.runtime.mesh import destroy, init_distributed  # noqa: E402
from plait.runtime.spawn import start_ranks  # noqa: E402


def _worker(rank: int, world: int, work: str) -> None:
    torch.set_num_threads(1)
    init_distributed("gloo", 300, f"file://{work}/rdzv", rank, world)
    try:
        groups = [list(range(s, s + 2)) for s in range(0, world, 2)]
        got = measure_insitu(rank, groups, torch.float32, torch.device("cpu"))
        if rank == 0:
            (Path(work) / "out.json").write_text(json.dumps(got))
        dist.barrier()
    finally:
        destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    args = ap.parse_args()
    for world in args.ranks:
        with tempfile.TemporaryDirectory() as work:
            start_ranks(_worker, (world, work), world)
            got = json.loads((Path(work) / "out.json").read_text())
        for op, m in got.items():
            print(f"{world} ranks, pairs: {op:10s} {m['bytes'] / 1024:4.0f} KiB  in situ "
                  f"{m['insitu_s'] * 1e3:5.2f} ms/call (adds {m['added_s'] * 1e3:5.2f})  bare "
                  f"{m['bare_s'] * 1e3:5.2f} ms/call  (compute slice {m['slice_s'] * 1e3:.2f} ms)")


if __name__ == "__main__":
    main()
