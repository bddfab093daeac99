"""Compile time: `lower()` of every rank of a layout, cold (empty trace / shape caches) against warm
(the caches a previous compile of the same model and plan left), in CPU seconds of this process on
one thread (wall time on a shared machine measures the neighbours).

Rows: the three tiny test models (dense, MoE, hybrid Mamba) on real CPU weights, and
Llama-3.1-405B on the meta device (no storage: `plait compile`'s path) for a few ranks of a
tp8 pp16 layout. Cold is what one `plait compile` pays for its first rank; the per-rank column is
what every further rank of the same program costs.

    .venv/bin/python benchmarks/compile_time.py [--ranks 4]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 0.5  # the bound for compiling one rank of a tiny model (warm)


def _plan(spec, layout):
    from plait.ir.plan import ParallelPlan, even_stages
    from plait.lowering.compile import dense_layout
    layout = dense_layout(layout)
    return ParallelPlan(job="compile-time", model=spec.name, cluster="local-cpu", world=layout.world,
                        layout=layout, stages=even_stages(spec.num_layers, layout.pp, layout.vpp),
                        global_batch=layout.dp * layout.mbs * 2, seq_len=16)


def _build(spec, meta: bool):
    from plait.lowering.build import build_model
    if not meta:
        return build_model(spec, seed=0)
    with torch.device("meta"):
        return build_model(spec, device="meta", seed=0)


def _lower_ranks(spec, plan, ranks: list[int], meta: bool) -> list[float]:
    """CPU seconds of lower() per rank (the model build is not counted: it is not compilation)."""
    from plait.lowering.compile import lower
    out = []
    for rank in ranks:
        model = _build(spec, meta)
        start = time.process_time()
        lower(model, spec, plan, rank)
        out.append(time.process_time() - start)
    return out


def measure(name: str, spec, layout, ranks: list[int], meta: bool = False) -> dict:
    from plait.lowering import trace_cache
    plan = _plan(spec, layout)
    layout = plan.layout
    trace_cache.clear()
    cold = _lower_ranks(spec, plan, ranks, meta)  # rank 0 cold; later ranks reuse rank 0's trace
    warm = _lower_ranks(spec, plan, ranks, meta)  # the same program compiled again
    with trace_cache.disabled():  # one rank is enough to know what a compile costs without caches
        uncached = _lower_ranks(spec, plan, ranks[:1] if meta else ranks, meta)
    return {"name": name, "layout": layout.short(), "ranks": len(ranks), "cold": cold[0],
            "later": sum(cold[1:]) / max(1, len(cold) - 1), "warm": sum(warm) / len(warm),
            "uncached": sum(uncached) / len(uncached)}


def cases(ranks: int, dry_run: bool) -> list[tuple]:
    from plait.ir.dsl import load_model
    from plait.ir.plan import Layout
    tiny = lambda kind: load_model(str(ROOT / "specs" / "models" / f"tiny-{kind}.plait"))  # noqa: E731
    out = [("tiny-dense", tiny("dense"), Layout(tp=2, pp=2, dp=2, mbs=1), False),
           ("tiny-moe", tiny("moe"), Layout(dp=4, ep=2, edp=2, pp=2, mbs=1), False),
           ("tiny-hybrid", tiny("hybrid"), Layout(tp=2, pp=2, dp=2, mbs=1), False)]
    if not dry_run:
        big = load_model(str(ROOT / "specs" / "models" / "llama-3.1-405b.plait"))
        out.append(("llama-3.1-405b (meta)", big, Layout(tp=8, pp=16, dp=1, mbs=1), True))
    # 405B: two ranks (a cold one, then its TP peer); each compile of it takes tens of CPU seconds
    return [(n, s, lay, list(range(min(2 if meta else ranks, lay.world))), meta)
            for n, s, lay, meta in out]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4, help="ranks compiled per model")
    parser.add_argument("--dry-run", action="store_true", help="tiny models only, 2 ranks")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(n, s, lay, r, meta)
            for n, s, lay, r, meta in cases(2 if args.dry_run else args.ranks, args.dry_run)]
    table = Table(title="lower() CPU seconds per rank: cold vs warm trace / shape caches")
    for col in ("model", "layout", "ranks", "cold (1st rank)", "later ranks", "warm (same plan)",
                "no cache", "no cache / warm"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["layout"], str(r["ranks"]), f"{r['cold']:.3f}", f"{r['later']:.3f}",
                      f"{r['warm']:.3f}", f"{r['uncached']:.3f}", f"{r['uncached'] / r['warm']:.1f}x")
    Console(width=160).print(table)
    slow = [r["name"] for r in rows if "meta" not in r["name"] and r["warm"] > TARGET_S]
    print(f"tiny models warm <= {TARGET_S} s per rank: " + ("yes" if not slow else f"NO ({slow})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
