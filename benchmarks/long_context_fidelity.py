"""Long-context Mixtral-8x22B on 128 H100 (specs/jobs/mixtral-8x22b-128gpu.plait): plait's predicted
step time and MFU at 4K .. 128K tokens per sequence, the tokens per step held at 1M (global batch
256 x 4K, 64 x 16K, ... 8 x 128K), and the attention core's share of the FLOPs and of the step.

A prediction table, not a fit: no published row of this sweep is in shared/reference. It shows
what the attention core's physics does at long context, where the core is over half the FLOPs:
its efficiency falling with the length one kernel call sees (attn_knee; under ring context
parallelism seq_len / cp), and the ring's K/V exchange hidden at overlap_p2p beside it.

Two layouts per length: context parallelism pinned as Megatron-Core's long-context recipes set it
(cp = seq_len / 4096: every rank's kernel sees 4K tokens; the rest searched), and the planner's
own search. `--json FILE` writes the rows; `--compare FILE` prints a saved run's rows beside this
one's (a run of the same script on another revision of plait: before / after a cost-model change).

    .venv/bin/python benchmarks/long_context_fidelity.py [--json out.json] [--compare before.json]

Measured when the attention knee came in (searched layouts, MFU at 4K / 16K / 32K / 64K / 128K):
main before it (attn_eff 0.5, attn_bwd_ratio 0.86 defaults, ring hidden at the generic overlap)
49.9 / 46.2 / 42.1 / 37.9 / 34.7%; with the cuDNN curve and overlap_p2p 49.9 / 47.0 / 42.7 /
39.1 / 36.0%; the H100 spec before the communication-only fit (attn_eff 0.7, overlap 0.5)
49.3 / 47.6 / 44.7 / 42.1 / 40.2%.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from plait.ir.dsl import load_job
from plait.ir.errors import LayoutError
from plait.kinds.attention import cost as attention_cost
from plait.planner.cost.compute import BWD_CORE
from plait.planner.cost.context import Context
from plait.planner.search import estimate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from long_context_search import attention_share  # noqa: E402  (the core's share of the FLOPs)

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "specs" / "jobs" / "mixtral-8x22b-128gpu.plait"
LENGTHS = (4096, 16384, 32768, 65536, 131072)
TOKENS_PER_STEP = 256 * 4096  # the published 4K job's


def core_seconds(job, layout) -> float:
    """Seconds per step one rank of the first stage spends in the attention core: forward,
    backward at its rate, and the forward again when the layers recompute."""
    ctx = Context(job, layout)
    work = attention_cost.work(ctx)
    passes = 1 + BWD_CORE / work.core_bwd_rate + (layout.recompute != "none")
    return work.core * passes * job.model.count("attention") / layout.pp * ctx.microbatches


def row(job, pins: dict) -> dict:
    try:
        plan = estimate(job, pins)
    except LayoutError:
        return {"layout": "none fits"}
    p = plan.prediction
    return {"layout": plan.layout.short(), "step_s": p.step_time, "mfu": p.mfu,
            "core_share": core_seconds(job, plan.layout) / p.step_time,
            "cp_exposed_s": dict(p.exposed_comm).get("cp", 0.0)}


def sweep() -> list[dict]:
    base = load_job(JOB)
    out = []
    for seq in LENGTHS:
        job = dataclasses.replace(base, seq_len=seq, global_batch=TOKENS_PER_STEP // seq,
                                  name=f"{base.name}-{seq // 1024}k")
        out.append({"seq": seq, "global_batch": job.global_batch,
                    "flop_share": attention_share(job),
                    "pinned": row(job, {"cp": max(1, seq // 4096)}), "searched": row(job, {})})
    return out


def _cells(r: dict) -> list[str]:
    if "step_s" not in r:
        return [r["layout"], "-", "-", "-", "-"]
    return [r["layout"], f"{r['step_s']:.2f}", f"{r['mfu']:.1%}", f"{r['core_share']:.0%}",
            f"{r['cp_exposed_s']:.2f}"]


def show(rows: list[dict], before: list[dict] | None) -> None:
    for mode in ("pinned", "searched"):
        title = ("cp = seq / 4096 pinned" if mode == "pinned" else "layout searched")
        t = Table(title=f"Mixtral-8x22B, 128 H100, 1M tokens per step: {title}")
        for col in ("seq", "batch", "core FLOPs"):
            t.add_column(col, justify="right")
        runs = ([("before", before)] if before else []) + [("now", rows)]
        for name, _ in runs:
            for col in ("layout", "step s", "MFU", "core % of step", "exposed cp s"):
                t.add_column(f"{name}: {col}", justify="left" if col == "layout" else "right")
        for i, r in enumerate(rows):
            cells = [f"{r['seq'] // 1024}K", str(r["global_batch"]), f"{r['flop_share']:.0%}"]
            for _, run in runs:
                cells += _cells(run[i][mode])
            t.add_row(*cells)
        Console(width=260).print(t)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--compare", help="a --json file of another run, shown beside this one")
    args = parser.parse_args(argv)
    rows = sweep()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    before = json.loads(Path(args.compare).read_text()) if args.compare else None
    show(rows, before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
