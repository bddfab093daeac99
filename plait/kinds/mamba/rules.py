"""Mamba2's rows of the legality-and-capability table (protocol: kinds/attention/rules.py)."""
from __future__ import annotations

from typing import Optional

from plait.ir.legality import LEGAL, RUNNABLE, Workload, divides, rule
from plait.ir.plan import Layout


def heads_over_tp(w: Workload, lay: Layout) -> Optional[str]:
    """x, dt, A and D split by heads (Megatron-Core's MambaMixer)."""
    return divides("mamba heads", w.model.mamba.heads, "tp", lay.tp)


def groups_over_tp(w: Workload, lay: Layout) -> Optional[str]:
    """B, C and the gated norm split by groups."""
    return divides("mamba groups", w.model.mamba.groups, "tp", lay.tp)


def conv_halo_fits_cp_chunk(w: Workload, lay: Layout) -> Optional[str]:
    """plait's context-parallel conv takes its halo (conv - 1 tokens) from the previous chunk only."""
    if lay.cp == 1:
        return None
    chunk, halo = w.seq_len // (2 * lay.cp), w.model.mamba.conv - 1
    if chunk >= halo:
        return None
    return (f"a CP chunk of seq_len/(2*cp) = {w.seq_len}/{2 * lay.cp} = {chunk} tokens is shorter "
            f"than the Mamba conv halo of conv - 1 = {halo} tokens")


RULES = (
    rule("mamba-heads-tp", LEGAL, "tensor", ("tp",), heads_over_tp),
    rule("mamba-groups-tp", LEGAL, "tensor", ("tp",), groups_over_tp),
    rule("mamba-conv-halo-cp", RUNNABLE, "context", ("cp",), conv_halo_fits_cp_chunk),
)
