"""Folded vs unfolded MoE layouts, and how much folding gains on a job.

*Unfolded* is Megatron-Core's MoE mapping before MoE Parallel Folding (Liu et al., "MoE Parallel
Folding: Heterogeneous Parallelism Mappings for Efficient Large-Scale MoE Model Training with
Megatron Core", arXiv:2504.14960): MoE layers reuse the attention layers' tensor parallelism
(ETP = TP) and the expert-parallel group is carved out of the data-parallel group (EP is a sub-group
of DP, so dp % ep == 0 and EP <= DP; context-parallel ranks are never part of an EP group). The
paper's Table 3 calls this baseline "MCore" (reference/moe_folding_table3.csv, method ``mcore``).
Folding lifts both constraints: ETP != TP, and EP may span TP, CP and DP ranks of the attention
layout (the expert side's ETP x EP x EDP only has to cover the same ranks).

"EP inside DP" means every expert EP group of ``planner.groups`` lies inside one dense DP group;
``ep_inside_dp`` decides it from the rank order's strides without building a group (proof in its
docstring; tests check it against the built groups on every small world). Megatron-Core before folding also ran CP > 1 with EP > 1, its EP groups
striding over DP ranks only; the expert rank generator used here has no CP slot (CP is folded into
EDP or EP), so such layouts are not enumerated and unfolded layouts with CP > 1 have EP = 1.
"""
from __future__ import annotations

from math import prod
from typing import Optional

from plait.ir.job import TrainJob
from plait.ir.plan import Layout, ParallelPlan

from .groups import groups_over, parse_order, side_sizes
from .wording import device_word, flops_rate, seconds_pair


def _stride(lay: Layout, side: str, dim: str) -> int:
    """How far apart in rank two neighbours along ``dim`` are on ``side`` (first name fastest)."""
    sizes = side_sizes(lay, side)
    names = parse_order(lay.order)
    return prod(sizes[n] for n in names[:names.index(dim)])


def ep_inside_dp(lay: Layout) -> bool:
    """Does every expert-parallel group lie inside one dense data-parallel group?

    Arithmetic, no groups: with s the expert side's EP stride and D the dense side's DP stride, an
    EP group is {low + s*(i + ep*high) : i < ep} (low < s) and a rank r has dense coordinates
    x = r mod D (the dimensions before dp), y = (r div D) mod dp, z = r div (D*dp). x is the same
    for every i iff D divides s (take i = 1, low = 0). Then with k = s / D the group's
    r div D = l + k*i + k*ep*high (l < k) must fall in one block of dp: true iff k*ep divides dp
    (blocks of k*ep tile the line and a block that straddles a multiple of dp holds a group that
    straddles it: some l < k has l below the multiple and l + k*(ep-1) at or above it)."""
    if lay.ep == 1:
        return True
    s, d = _stride(lay, "expert", "ep"), _stride(lay, "dense", "dp")
    return s % d == 0 and lay.dp % (s // d * lay.ep) == 0


def is_unfolded(lay: Layout) -> bool:
    """Megatron-Core's pre-folding MoE mapping: ETP = TP and EP inside DP (see the module doc)."""
    return lay.etp == lay.tp and ep_inside_dp(lay)


def what_folds(lay: Layout) -> list[str]:
    """The ways ``lay`` departs from the unfolded mapping, in words."""
    out = []
    if lay.etp != lay.tp:
        out.append(f"experts run ETP{lay.etp} beside attention TP{lay.tp}")
    if not ep_inside_dp(lay):
        spans = " x ".join(f"{d.upper()}{n}" for d, n in ep_spans(lay).items())
        out.append(f"its EP{lay.ep} group spans {spans} of the attention layout (EP inside DP "
                   f"would stride over DP{lay.dp} ranks only)")
    return out


def ep_spans(lay: Layout) -> dict[str, int]:
    """How many distinct attention-side TP / CP / DP coordinates the first EP group covers."""
    group = groups_over(lay, "expert", ("ep",))[0]
    out = {}
    for dim in ("tp", "cp", "dp"):
        coord = {r: i for g in groups_over(lay, "dense", (dim,)) for i, r in enumerate(g)}
        n = len({coord[r] for r in group})
        if n > 1:
            out[dim] = n
    return out


def gain_line(job: TrainJob, winner: ParallelPlan, unfolded: Optional[ParallelPlan],
              reasons: list[str], smallest_need: Optional[float] = None,
              any_legal: bool = True) -> str:
    """One explanation line: what folding gains over the best unfolded layout, and why.
    ``smallest_need``: bytes the least hungry unfolded layout needs when none fits;
    ``any_legal``: False when the rules and pins leave no unfolded mesh at all."""
    w = winner.prediction
    if is_unfolded(winner.layout):
        return ("the winner is unfolded (ETP = TP, EP inside DP, as Megatron-Core before MoE "
                "Parallel Folding): no folded layout is faster on this job")
    how = "; ".join(what_folds(winner.layout))
    if unfolded is None and not any_legal:
        return f"the rules and pinned dimensions leave no unfolded layout (ETP = TP, EP inside DP); {how}"
    if unfolded is None:
        need = (f" (the smallest memory need found is {smallest_need / 2**30:.1f} GiB of "
                f"{job.cluster.device.memory / 2**30:.0f} GiB)") if smallest_need else ""
        return f"folding is required: no unfolded layout (ETP = TP, EP inside DP) fits{need}; {how}"
    u = unfolded.prediction
    theirs, ours = seconds_pair(u.step_time, w.step_time)
    gain = (u.step_time / w.step_time - 1) * 100
    because = "; ".join([how] + reasons)
    return (f"folding gains {gain:.1f}% over the best unfolded layout (ETP = TP, EP inside DP) "
            f"{unfolded.layout.short()} ({unfolded.layout.dp_kind}): {theirs} s vs {ours} s per step, "
            f"{flops_rate(u.tflops_per_gpu * 1e12)} vs {flops_rate(w.tflops_per_gpu * 1e12)} per "
            f"{device_word(job.cluster.backend)}, because {because}")
