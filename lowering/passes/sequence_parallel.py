"""Sequence parallelism (Megatron-LM, Korthikanti et al. 2022): outside the TP regions (norms,
residual stream, embedding output) activations are split along the sequence over the TP group.

The rewrite is local to the TP boundaries: a region's entry `copy_to_tp` becomes an all-gather
along the sequence (`gather_seq`, reduce-scatter backward) and its exit `reduce_from_tp` becomes a
reduce-scatter (`scatter_seq`, all-gather backward). Norm weights then see only this rank's tokens;
the data-parallel pass finds them and sums their gradients over TP.
"""
from __future__ import annotations

import torch
import torch.fx

from plait.lowering import sharding

from .base import Pass, Target, VerifyError, require_legal
from .shard_tensor_parallel import AXIS, check_stream_shapes

SEQ_DIM = 1  # activations are [batch, seq, hidden]
_SWAP = {
    torch.ops.plait.copy_to_tp.default: torch.ops.plait.gather_seq.default,
    torch.ops.plait.reduce_from_tp.default: torch.ops.plait.scatter_seq.default,
}


def sequence_parallel(gm: torch.fx.GraphModule, t: Target) -> torch.fx.GraphModule:
    if not t.layout.sp or t.layout.tp == 1:
        return gm
    require_legal(t, "sequence")  # the CP-local tokens divide by tp (ir/legality.py)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _SWAP:
            x, axis, size = node.args
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(_SWAP[node.target], (x, axis, size, SEQ_DIM))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def verify_sequence_parallel(gm: torch.fx.GraphModule, t: Target) -> None:
    if not t.layout.sp or t.layout.tp == 1:
        return
    left = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _SWAP]
    if left:
        raise VerifyError(f"{len(left)} TP boundary collectives were not rewritten: {left[0]}")
    states = sharding.propagate(gm)
    stream = [n for n, s in states.items() if s == sharding.S]
    if not stream:
        raise VerifyError("no sequence-sharded values after sequence_parallel")
    check_stream_shapes(gm, t, seq_parts=t.layout.tp)


SEQUENCE_PARALLEL = Pass(
    name="sequence_parallel", run=sequence_parallel, verify=verify_sequence_parallel,
    requires=("tensor-parallel",), ensures=("sequence-parallel",),
    doc=f"all-gather / reduce-scatter along the sequence around TP regions ({AXIS} axis)")
