"""Facet functions for what a kind does not have: no experts a token skips, nothing kept in fp32,
nothing selective recompute re-runs, no layer-list checks, no structure a prune width can break,
no train-job options, no objection to packed documents; in lowering, no mixer traced whole, no
whole-sequence op, no routed experts; in pruning, one ranking group, no
structural width multiple or hint, nothing that refuses pruning. A kind's facet module binds the protocol
name to one of these (``inactive_params = absent.nothing_counted``), so every kind still exposes
the same names (the protocols are at the top of plait/kinds/attention/<facet>.py). Imports
nothing of the stages."""
from __future__ import annotations


def no_params(model) -> int:
    return 0


def no_fp32_params(model, tp: int = 1) -> float:
    return 0.0


def no_recompute_flops(model, seq_len: int, causal: bool = True) -> float:
    return 0.0


def no_layer_checks(r, block, layers) -> None:
    return None


def no_structure_problem(model, axis: str, width: int) -> None:
    return None


def no_job_options(r) -> None:
    return None


def no_job_option_entries(options) -> list:
    return []


def no_document_mask_problem(model) -> None:
    return None


def no_traced_whole() -> tuple:
    return ()


def no_sequence_ops() -> tuple:
    return ()


def no_routed_experts() -> bool:
    return False


def one_group(model, axis: str) -> int:
    return 1


def no_structural_step(model, axis: str) -> None:
    return None


def no_structure_hint(model, axis: str) -> None:
    return None


def no_prune_checks(model, layers) -> None:
    return None


def no_buffers(ctx) -> float:
    """Cost facet: no communication buffers beside the model's (only MoE dispatch has them)."""
    return 0.0


def no_cp_host(ctx) -> float:
    return 0.0


def no_experts_host(ctx) -> float:
    return 0.0


def no_uncertain_ranges(ctx) -> dict:
    """Cost facet: no calibration key of the kind's own whose plausible range the layout sets."""
    return {}


def no_topology_checks(layout) -> tuple:
    """Cost facet: no groups of the kind's own for the explanation's crossing-nodes facts."""
    return ()
