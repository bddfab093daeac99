"""Communication truth for MoE layers: the bytes the token dispatchers actually send in one training
step of the compiled tiny-moe model on 4 gloo ranks (counted inside the dispatcher's collectives,
forward and backward, token rows only), against the bytes the planner's cost model moves for the
same job and layout: the MoE cost facet's `dispatch_comm` evaluated with collectives valued in
bytes sent (an all-to-all of S bytes sends (n-1)/n S, an all-gather / reduce-scatter of a full
tensor of S bytes (n-1)/n S); backward moves the forward volume again, per micro-batch, per MoE
layer.

"mean" is the mean over ranks of the bytes each rank sent; "busiest" the largest of any rank's sent
or received bytes (the cost model sizes the all-to-all by the busiest expert rank: dropless it
assumes the expected busiest rank of balanced random routing (plait/kinds/moe/cost.py
expected_max_load; a calibrated `moe_imbalance` replaces it), with a capacity factor the smaller
of cf and that, padded cf; "model load" is the factor each row assumes).

    .venv/bin/python benchmarks/moe_comm_truth.py
"""
from __future__ import annotations

import statistics
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_ranks import mesh_for, run_ranks  # noqa: E402

from plait.ir.cluster import local_cpu  # noqa: E402
from plait.ir.dsl import load_model  # noqa: E402
from plait.ir.job import Data, MoEOptions, Precision, TrainJob  # noqa: E402
from plait.ir.plan import Layout, ParallelPlan, even_stages  # noqa: E402
from plait.lowering.moe import comm  # noqa: E402
from plait.planner.cost import comm as cost_comm  # noqa: E402
from plait.kinds.moe import cost as moe_cost  # noqa: E402
from plait.planner.cost.context import Context  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORLD, SEQ, MBS, MICRO = 4, 128, 2, 2
CASES = [
    ("dp4 | ep4", Layout(dp=4, ep=4, mbs=MBS), MoEOptions()),
    ("dp4 | ep4", Layout(dp=4, ep=4, mbs=MBS), MoEOptions(capacity_factor=1.0)),
    ("dp4 | ep4", Layout(dp=4, ep=4, mbs=MBS), MoEOptions(capacity_factor=1.0, pad_to_capacity=True)),
    ("dp4 | ep2 etp2", Layout(dp=4, ep=2, etp=2, mbs=MBS), MoEOptions()),
    ("tp2 sp dp2 | ep2 edp2", Layout(tp=2, sp=True, dp=2, ep=2, edp=2, mbs=MBS), MoEOptions()),
    ("dp4 | ep4 allgather", Layout(dp=4, ep=4, mbs=MBS, dispatcher="allgather"), MoEOptions()),
]


def job(layout: Layout, moe: MoEOptions) -> TrainJob:
    spec = load_model(ROOT / "specs/models/tiny-moe.plait")
    return TrainJob(name="comm-truth", model=spec, cluster=local_cpu(WORLD),
                    global_batch=layout.dp * MBS * MICRO, seq_len=SEQ, precision=Precision("fp32"),
                    moe=replace(moe, dispatcher=layout.dispatcher), data=Data(synthetic=True))


def plan(j: TrainJob, layout: Layout) -> ParallelPlan:
    return ParallelPlan(job=j.name, model=j.model.name, cluster="local-cpu", world=WORLD,
                        layout=layout, stages=even_stages(j.model.num_layers, 1),
                        global_batch=j.global_batch, seq_len=SEQ, moe=j.moe)


def measured(rank: int, world: int) -> list[dict]:
    from plait.runtime.data import SyntheticTokens
    from plait.runtime.train import Trainer

    out = []
    for _, layout, moe in CASES:
        j = job(layout, moe)
        trainer = Trainer(j, plan(j, layout), mesh_for(layout), source=SyntheticTokens(j.model.vocab))
        with comm.counting() as c:
            trainer.forward_backward(0)
        out.append({"sent": c.total(comm.TOKEN_OPS), "received": c.total(comm.TOKEN_OPS, received=True)})
    return out


def _bytes_sent(ctx, g, nbytes, *args) -> float:
    """What one rank sends in the cost model's collective of ``nbytes`` over group ``g``: an
    all-to-all scatters nbytes (its own 1/n stays), a ring all-gather / reduce-scatter of a full
    tensor of nbytes passes (n-1)/n of it."""
    return 0.0 if g.size <= 1 else nbytes * (g.size - 1) / g.size


@contextmanager
def collectives_in_bytes():
    """Evaluate the cost model's formulas with collectives valued in bytes sent instead of
    seconds (the formulas are sums and multiples of collectives, so the result is their bytes)."""
    names = ("all_to_all", "all_gather", "reduce_scatter")
    originals = {n: getattr(cost_comm, n) for n in names}
    for n in names:
        setattr(cost_comm, n, _bytes_sent)
    try:
        yield
    finally:
        for n, f in originals.items():
            setattr(cost_comm, n, f)


def predicted(layout: Layout, moe: MoEOptions) -> float:
    """Bytes one rank sends per step in all MoE layers, by the cost model: its per-layer forward
    dispatch volume, again in backward, per micro-batch, per MoE layer."""
    j = job(layout, moe)
    with collectives_in_bytes():
        forward = moe_cost.dispatch_comm(Context(j, layout))
    return 2 * forward * MICRO * j.model.layers.count("moe")


def mode(moe: MoEOptions) -> str:
    if moe.capacity_factor is None:
        return "dropless"
    return f"cf {moe.capacity_factor} {moe.drop_policy}" + (" + pad" if moe.pad_to_capacity else "")


def main() -> None:
    ranks = run_ranks(measured, WORLD)
    table = Table(title=f"MoE dispatch bytes per step, tiny-moe (3 MoE layers), {WORLD} gloo ranks, "
                        f"seq {SEQ}, mbs {MBS}, {MICRO} micro-batches, fp32")
    for col in ("layout (dense | expert)", "mode", "measured mean KiB", "measured busiest KiB",
                "busiest / mean", "model load", "cost model KiB", "mean / model",
                "busiest / model"):
        table.add_column(col, justify="left" if col in ("layout (dense | expert)", "mode")
                         else "right")
    for i, (name, layout, moe) in enumerate(CASES):
        mean = statistics.mean(r[i]["sent"] for r in ranks)
        busiest = max(max(r[i]["sent"], r[i]["received"]) for r in ranks)
        model = predicted(layout, moe)
        load = (1.0 if layout.dispatcher == "allgather"
                else moe_cost.expert_load(Context(job(layout, moe), layout)))
        table.add_row(name, mode(moe), f"{mean / 1024:,.1f}", f"{busiest / 1024:,.1f}",
                      f"{busiest / mean:.3f}", f"{load:.2f}", f"{model / 1024:,.1f}",
                      f"{mean / model:.3f}", f"{busiest / model:.3f}")
    table.caption = CAPTION
    Console(width=200).print(table)


CAPTION = (
    "cost model assumption (plait/kinds/moe/cost.py expert_load): the all-to-all is sized by the "
    "busiest expert rank = 'model load' x the balanced volume. Dropless: the expected busiest rank "
    "of balanced random routing (expected_max_load; the least imbalance a router shows), or the "
    "calibration's measured moe_imbalance; capacity factor cf: the smaller of cf and that, tokens "
    "over capacity dropped (measured below the model when some experts get fewer than cf x their "
    "share); padded to capacity: cf, "
    "exact. The allgather dispatcher moves every token: exact. 'busiest / mean' is the imbalance "
    "measured on tiny-moe's untrained router.")


if __name__ == "__main__":
    main()
