"""MoE's rows of the legality-and-capability table (protocol: kinds/attention/rules.py), and the
two expert-split questions the expert modules ask on their own when built outside a plan
(``experts_over_ep``, ``ffn_over_etp``): the rows below are these two applied to a layout."""
from __future__ import annotations

from typing import Optional

from plait.ir.legality import LEGAL, RUNNABLE, Workload, divides, rule
from plait.ir.plan import Layout


def experts_over_ep(experts: int, ep: int) -> Optional[str]:
    """Every EP rank holds experts/ep whole experts."""
    return divides("experts", experts, "ep", ep)


def ffn_over_etp(ffn: int, etp: int) -> Optional[str]:
    """Every ETP rank holds ffn/etp columns of each of its experts."""
    return divides("expert ffn", ffn, "etp", etp)


def experts_over_ep_rule(w: Workload, lay: Layout) -> Optional[str]:
    return experts_over_ep(w.model.moe.experts, lay.ep)


def ffn_over_etp_rule(w: Workload, lay: Layout) -> Optional[str]:
    return ffn_over_etp(w.model.moe.ffn, lay.etp)


def shared_ffn_over_tp(w: Workload, lay: Layout) -> Optional[str]:
    """The shared expert is a dense MLP on the attention side's TP group."""
    shared = w.model.moe.shared_ffn
    return divides("shared expert ffn", shared, "tp", lay.tp) if shared else None


def sequence_parallel_with_tp(w: Workload, lay: Layout) -> Optional[str]:
    """Without SP the TP ranks hold the same tokens and would route them twice (Megatron-Core
    requires sequence parallelism for MoE with TP > 1 too)."""
    if lay.tp > 1 and not lay.sp:
        return (f"MoE layers with tp = {lay.tp} need sequence parallelism (sp = true): without it "
                f"the {lay.tp} TP ranks hold the same tokens and would route them twice")
    return None


def fsdp_shards_experts(w: Workload, lay: Layout) -> Optional[str]:
    """plait's runtime wraps every weight in one FSDP mesh over dp x cp; sharding expert weights
    over their own EDP mesh (as Megatron-FSDP does, and the planner costs) is not built yet."""
    if lay.dp_kind != "fsdp" or lay.edp == lay.dp * lay.cp:
        return None
    return (f"fsdp shards expert weights only when edp = dp*cp: edp = {lay.edp}, dp*cp = "
            f"{lay.dp}*{lay.cp} = {lay.dp * lay.cp} (use dp_shard = zero1 for this layout)")


RULES = (
    rule("moe-experts-ep", LEGAL, "experts", ("ep",), experts_over_ep_rule),
    rule("moe-ffn-etp", LEGAL, "experts", ("etp",), ffn_over_etp_rule),
    rule("moe-shared-ffn-tp", LEGAL, "tensor", ("tp",), shared_ffn_over_tp),
    rule("moe-sequence-parallel", LEGAL, "experts", ("tp", "sp"), sequence_parallel_with_tp),
    rule("moe-fsdp-experts", RUNNABLE, "experts", ("dp_kind", "edp", "dp", "cp"), fsdp_shards_experts),
)
