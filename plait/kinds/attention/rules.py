"""Attention's rows of the legality-and-capability table (plait/ir/legality.py).

The ``rules`` facet protocol, the same in every kind's package:

    RULES: tuple[legality.Rule, ...]
        the kind's rows; the table asks them only for models whose layers use the kind. Each
        row's check takes (workload, layout) and returns None or the reason with its arithmetic;
        its level says whether Megatron-Core forbids the layout (LEGAL) or plait's runtime cannot
        execute it yet (RUNNABLE).

Imports: ir only (the planner, the lowering passes and the launch check all read the table).
GQA, multi-head latent attention (MLA) and sliding windows share these rows: MLA splits its heads
over TP like GQA (each head has its own K/V after the latent up-projection, kv_heads = heads), and
a window changes neither the head split nor the zigzag chunks of context parallelism.
"""
from __future__ import annotations

from typing import Optional

from plait.ir.legality import LEGAL, Workload, divides, rule
from plait.ir.plan import Layout


def heads_over_tp(w: Workload, lay: Layout) -> Optional[str]:
    return divides("attention heads", w.model.attention.heads, "tp", lay.tp)


def kv_heads_over_tp(w: Workload, lay: Layout) -> Optional[str]:
    # Megatron-Core: num_query_groups must be a multiple of the tensor-parallel size
    return divides("kv_heads", w.model.attention.kv_heads, "tp", lay.tp)


def heads_over_alltoall_cp(w: Workload, lay: Layout) -> Optional[str]:
    """All-to-all (Ulysses) context parallelism trades the sequence split for a head split."""
    if lay.cp == 1 or lay.cp_comm != "alltoall":
        return None
    heads = w.model.attention.heads // lay.tp
    return divides("attention heads per tp rank", heads, "cp (all-to-all)", lay.cp)


RULES = (
    rule("attention-heads-tp", LEGAL, "tensor", ("tp",), heads_over_tp),
    rule("attention-kv-heads-tp", LEGAL, "tensor", ("tp",), kv_heads_over_tp),
    rule("attention-heads-alltoall-cp", LEGAL, "context", ("tp", "cp", "cp_comm"),
         heads_over_alltoall_cp),
)
