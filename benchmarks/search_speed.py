"""Planner speed: wall and CPU time of the full search (enumerate -> bound -> solve -> rank) per job,
the layouts enumerated / pruned, the exact partition solves, whether the winner's partition is
proven optimal (else its gap), and the winner. Every pruning is by a proven bound
(planner/bounds.py), so the winner is the best legal plan unless "N capped" says a solve cap
(MAX_ILP_SOLVES for mixed units at vpp > 1) left N candidates unsolved that no bound ruled out.
CPU seconds count this process and every child process it waited for (RUSAGE_SELF +
RUSAGE_CHILDREN), so a solver run as a subprocess cannot hide.
Targets on a 2-core machine: <= 2 s up to 1,024 GPUs, <= 10 s at 16,384.

Dense GPT jobs: Korthikanti et al.'s 22B on 8 A100 (the job Calculon's exhaustive search took
188 s on, plait 2.4 s before this planner) and GPT-3 175B from 64 to 16,384 A100.

    .venv/bin/python benchmarks/search_speed.py              # every legal plan (Megatron's rules)
    .venv/bin/python benchmarks/search_speed.py --runnable   # what `plait plan` / `plait run` offer:
                                                             # plans plait's runtime can execute
"""
from __future__ import annotations

import dataclasses
import resource
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from plait.ir.dsl import load_file, load_job, load_model
from plait.ir.job import Precision, TrainJob
from plait.planner.search import search

ROOT = Path(__file__).resolve().parents[1]
SPEC_JOBS = ("mixtral-8x22b-128gpu", "mixtral-8x22b-1024gpu", "qwen2-57b-a14b-64gpu",
             "llama-3.1-405b-16384gpu-8k", "llama-3.1-405b-16384gpu-128k", "nemotron-h-56b-pretrain")
# (model, GPUs, global batch): Korthikanti et al. Table 3 (22B on 8, 175B on 64), then GPT-3 175B
# at SC'21's batch on 1,024 and one sequence per data-parallel rank at 16,384
GPT_JOBS = (("gpt-22b", 8, 4), ("gpt3-175b", 64, 64), ("gpt3-175b", 1024, 1536),
            ("gpt3-175b", 16384, 16384))


def gpt_job(model: str, gpus: int, batch: int) -> TrainJob:
    cluster = load_file(ROOT / "specs" / "clusters" / "dgx-a100.plait").clusters["dgx-a100"]
    return TrainJob(name=f"{model}-{gpus}gpu", model=load_model(ROOT / "specs" / "models"
                                                                   / f"{model}.plait"),
                    cluster=dataclasses.replace(cluster, nodes=gpus // cluster.gpus_per_node),
                    global_batch=batch, seq_len=2048, precision=Precision(kind="bf16"))


def jobs() -> list[TrainJob]:
    return [gpt_job(*g) for g in GPT_JOBS] + [
        load_job(ROOT / "specs" / "jobs" / f"{name}.plait") for name in SPEC_JOBS]


def cpu_seconds() -> float:
    """User + system seconds of this process and of its waited-for children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> int:
    runnable = "--runnable" in sys.argv[1:]
    t = Table(title="planner search speed" + (" (runnable plans only)" if runnable else ""))
    for col in ("job", "GPUs", "wall s", "cpu s", "target s", "enumerated", "pruned", "solves",
                "partition", "best layout", "MFU"):
        t.add_column(col, justify="left" if col in ("job", "best layout", "partition") else "right")
    ok = True
    for job in jobs():
        wall, cpu = time.perf_counter(), cpu_seconds()
        res = search(job, runnable_only=runnable)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        target = 2.0 if job.cluster.world <= 1024 else 10.0
        ok &= wall <= target
        best = res.best
        opt = best.optimality if best else None
        t.add_row(job.name, str(job.cluster.world), f"{wall:.2f}", f"{cpu:.2f}", f"{target:.0f}",
                  str(res.enumerated), str(res.pruned), str(res.solved),
                  "-" if opt is None else ("proven" if opt.proven else f"gap {opt.gap:.2%}")
                  + (f", {res.capped} capped" if res.capped else ""),
                  best.layout.short() if best else "none fits",
                  f"{best.prediction.mfu:.1%}" if best else "-")
    t.caption = "all within target" if ok else "SOME SEARCHES OVER TARGET (is the machine busy?)"
    Console(width=220).print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
