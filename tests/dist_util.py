"""Run a function on a few gloo ranks from a test: spawned once (file:// rendezvous, one thread each,
a timeout on the group and on the spawn), each rank's result returned to the test, a rank's
traceback re-raised in the parent."""
from __future__ import annotations

import datetime
import os
import tempfile
import time
import traceback

import torch
import torch.distributed as dist

from plait.runtime.spawn import start_ranks

GROUP_TIMEOUT_S = 60
SPAWN_TIMEOUT_S = 240


def _worker(rank: int, world: int, init_file: str, out_dir: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    try:
        result = fn(rank, world, *args)
    except BaseException:
        result = {"__error__": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def spawn(fn, world: int, *args, timeout_s: float = SPAWN_TIMEOUT_S) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; returns each rank's result. A rank
    that raised reports its traceback in the parent; a hang is killed after ``timeout_s``."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        ctx = start_ranks(_worker, (world, init_file, tmp, fn, args), world, join=False)
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{world} ranks did not finish in {timeout_s} s")
        results = [_load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
    errors = [f"rank {r} failed:\n{res['__error__']}" for r, res in enumerate(results)
              if isinstance(res, dict) and "__error__" in res]
    if errors:  # the rank that failed first is usually the one whose peers lost their connection
        errors.sort(key=lambda e: "Connection closed by peer" in e)
        raise RuntimeError("\n".join(errors))
    return results


def _load(path: str):
    if not os.path.exists(path):
        return {"__error__": "the process died without a result (see its stderr)"}
    return torch.load(path, weights_only=True)  # results the ranks wrote: tensors and plain data
