"""A small collective issued the way training issues it (plait's ops between slices of decoder
compute, every group of the node at once) against the same op back to back (issue #17):
runtime/calibrate_insitu.py on 2 and 4 local gloo ranks.

    .venv/bin/python benchmarks/insitu_collectives.py [--ranks 2 4]
"""
from __future__ import annotations

import argparse
import json
import sys
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
