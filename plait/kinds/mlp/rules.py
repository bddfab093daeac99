"""The dense MLP's rows of the legality-and-capability table (protocol: kinds/attention/rules.py)."""
from __future__ import annotations

from typing import Optional

from plait.ir.legality import LEGAL, Workload, divides, rule
from plait.ir.plan import Layout


def ffn_over_tp(w: Workload, lay: Layout) -> Optional[str]:
    return divides("mlp ffn", w.model.mlp.ffn, "tp", lay.tp)


RULES = (
    rule("mlp-ffn-tp", LEGAL, "tensor", ("tp",), ffn_over_tp),
)
