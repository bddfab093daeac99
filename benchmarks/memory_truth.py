"""Memory truth: the planner's memory terms next to what the real runtime holds, per term and layout.

The real Trainer trains one step of the tiny jobs (runtime/harness/memory_probe.py: saved-tensor hooks for
the activations of one micro-batch, the rank's weights, gradients, ZeRO-1 master shards and their
gradients, Adam moments); the planner predicts the same layout (planner/cost/evaluate.py
rank_tensor_bytes). One table, rank 0 of each layout, measured / predicted side by side. "saved":
saved-tensor hooks (no recompute: the hooks cannot see checkpoint's stash); "live": the forward's
tensors alive when backward starts (any recompute; also holds the loss and the stage output);
"gathered": FSDP's gathered units and unsharded gradients at their peak.

    .venv/bin/python benchmarks/memory_truth.py
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from plait.ir.dsl import load_job
from plait.ir.plan import Layout
from plait.planner.cost.evaluate import rank_tensor_bytes
from plait.planner.cost.pipeline import CostTable
from plait.planner.layouts import units
from plait.runtime.harness.memory_probe import measure, probe_plan

ROOT = Path(__file__).resolve().parents[1]
TERMS = ("weights", "grads", "master", "master_grads", "moments", "saved", "live", "gathered")
CASES = {
    "tiny-local": {"dp2 replicated": Layout(dp=2, mbs=2, dp_kind="replicated"),
                   "dp2 zero1": Layout(dp=2, mbs=2, dp_kind="zero1"),
                   "dp2 fsdp": Layout(dp=2, mbs=2, dp_kind="fsdp"),
                   "tp2 sp zero1": Layout(tp=2, etp=2, sp=True, mbs=2, dp_kind="zero1"),
                   "dp2 selective": Layout(dp=2, mbs=2, recompute="selective"),
                   "dp2 full": Layout(dp=2, mbs=2, recompute="full"),
                   "dp2 fsdp full": Layout(dp=2, mbs=2, dp_kind="fsdp", recompute="full"),
                   "cp2 ring": Layout(cp=2, mbs=2, dp_kind="zero1")},
    "tiny-moe-local": {"dp2 zero1": Layout(dp=2, edp=2, mbs=2, dp_kind="zero1"),
                       "dp2 ep2 zero1": Layout(dp=2, ep=2, etp=1, edp=1, mbs=2, dp_kind="zero1"),
                       "tp2 sp zero1": Layout(tp=2, etp=2, sp=True, mbs=2, dp_kind="zero1"),
                       "tp2 sp ep2 zero1": Layout(tp=2, sp=True, ep=2, etp=1, edp=1, mbs=2,
                                                  dp_kind="zero1"),
                       "dp2 fsdp": Layout(dp=2, edp=2, mbs=2, dp_kind="fsdp")},
    "tiny-hybrid-local": {"dp2 zero1": Layout(dp=2, mbs=2, dp_kind="zero1"),
                          "tp2 sp zero1": Layout(tp=2, etp=2, sp=True, mbs=2, dp_kind="zero1"),
                          "dp2 selective": Layout(dp=2, mbs=2, recompute="selective"),
                          "dp2 fsdp": Layout(dp=2, mbs=2, dp_kind="fsdp"),
                          "cp2": Layout(cp=2, mbs=2, dp_kind="zero1")},
}


def _cell(got, pred) -> str:
    if got is None:
        return "-"
    return f"{got:,} / {pred:,.0f} ({got / pred:.3f})" if pred else f"{got:,} / 0"


def main() -> int:
    t = Table(title="memory truth: measured / predicted bytes on rank 0 (one micro-batch)")
    t.add_column("job")
    t.add_column("layout")
    for term in TERMS:
        t.add_column(term, justify="right")
    for name, layouts in CASES.items():
        job = load_job(ROOT / "specs" / "jobs" / f"{name}.plait")
        job = dataclasses.replace(job, cluster=dataclasses.replace(job.cluster, gpus_per_node=2))
        for case, records in measure(job, layouts).items():
            lay = layouts[case]
            pred = rank_tensor_bytes(CostTable(job, lay, units(job.model)),
                                     probe_plan(job, lay).stages, 0)
            got = dict(records[0])
            pred["live"] = pred["saved"]  # alive when backward starts: the same prediction
            t.add_row(name, case, *[_cell(got[k], pred[k]) for k in TERMS])
    Console(width=260).print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
