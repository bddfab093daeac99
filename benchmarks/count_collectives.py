"""How many collective calls one training step of a layout issues, per rank: plait's runtime trains
the plan on local gloo ranks (runtime/harness/step_probe.py's trainer) while every
torch.distributed entry point it can call is counted (issue #17: calls x in-situ cost against the
measured step).

    .venv/bin/python benchmarks/count_collectives.py tiny-local "tp2 sp"
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
import tempfile
from pathlib import Path

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from plait.ir.dsl import load_job
from plait.runtime.harness.step_probe import local_rank, trainer_for
from plait.runtime.spawn import start_ranks

ENTRY = ("all_reduce", "all_gather_into_tensor", "all_gather", "reduce_scatter_tensor",
         "all_to_all_single", "all_to_all", "send", "recv", "broadcast", "batch_isend_irecv",
         "barrier",
         "all_gather_single", "reduce_scatter_single")  # the last two: FSDP2's (fully_shard)
# torch.distributed.pipelining's schedules send a batch of only sends (or only receives) as bare
# isend / irecv calls (schedules.py _batch_p2p) and mixed batches through batch_isend_irecv, which
# calls isend / irecv itself: those inner calls are not counted again
SINGLE_P2P = ("isend", "irecv")
COUNTS: collections.Counter = collections.Counter()
INSIDE = [0]  # batch_isend_irecv calls in progress


def _counted(name, fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not INSIDE[0]:
            COUNTS[name] += 1
        INSIDE[0] += name == "batch_isend_irecv"
        try:
            return fn(*args, **kwargs)
        finally:
            INSIDE[0] -= name == "batch_isend_irecv"
    return call


def _wrap_single_p2p() -> None:
    """Count isend / irecv: P2POp checks that its op *is* distributed_c10d's isend / irecv, so
    the module's own names and torch.distributed's are replaced by the same wrapper."""
    for name in SINGLE_P2P:
        wrapped = _counted(name, getattr(c10d, name))
        setattr(c10d, name, wrapped)
        setattr(dist, name, wrapped)


def _worker(rank: int, world: int, job_path: str, layout, work: str) -> None:
    with local_rank(rank, world, work):
        trainer = trainer_for(load_job(job_path), layout)
        for name in (n for n in ENTRY if hasattr(dist, n)):
            setattr(dist, name, _counted(name, getattr(dist, name)))
        _wrap_single_p2p()
        trainer.train_step(0, 3)
        COUNTS.clear()
        trainer.train_step(1, 3)
        (Path(work) / f"rank{rank}.json").write_text(json.dumps(dict(COUNTS)))


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from predict_vs_measure import CASES, ROOT  # benchmarks/predict_vs_measure.py's layouts

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job", choices=sorted(CASES))
    ap.add_argument("layout", help="a layout name of predict_vs_measure's table for that job")
    args = ap.parse_args()
    if args.layout not in CASES[args.job]:
        ap.error(f"{args.job} has no layout {args.layout!r}; "
                 f"choose from {', '.join(CASES[args.job])}")
    layout = CASES[args.job][args.layout]
    path = str(ROOT / "specs" / "jobs" / f"{args.job}.plait")
    with tempfile.TemporaryDirectory() as work:
        start_ranks(_worker, (layout.world, path, layout, work), layout.world)
        for r in range(layout.world):
            got = json.loads((Path(work) / f"rank{r}.json").read_text())
            print(f"rank {r}: {sum(got.values())} calls {got}")


if __name__ == "__main__":
    main()
