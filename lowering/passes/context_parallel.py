"""Context parallelism: split every sequence over the CP group in the zigzag layout (2*cp chunks,
rank i holds chunks i and 2*cp-1-i) and make each sequence-mixing op CP-aware.

The rewrite replaces the few nodes that look along the sequence (the reference model keeps each one
a single fx node for this reason); each block kind lists its own in its parallelize facet
(``sequence_ops``, plait/kinds/<kind>/parallelize.py), today:

  tokens, labels        -> zigzag_shard(., cp, rank)        this rank's chunks of the micro-batch
  sequence_positions    -> zigzag_positions(., cp, rank)    global RoPE positions of the chunks
  causal_attention      -> ring_attention (layout cp_comm = "ring") or ulysses_attention ("alltoall"),
                           with the layer's sliding window when it has one
  document_attention    -> ring_ / ulysses_document_attention   (packed documents, cp_documents.py)
  causal_conv1d         -> cp_causal_conv1d                 with the predecessor chunks' halos
  ssd_scan              -> cp_ssd_scan                       states passed across chunks

Everything else (projections, norms, MLPs, experts, the per-token loss) is per token; MoE layers
route their local tokens, and EP groups may fold CP ranks (dispatch_experts). Each rank's loss is
the mean over its own tokens, all ranks hold equally many, so the step's loss and gradients are
averages over DP x CP: the runtime reduces dense gradients over the "dp-cp" group.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx

from plait.ir import kinds
from plait.ir.errors import LayoutError
from plait.lowering import cp_ops
from plait.lowering.shard_plans import SequenceOp
from plait.lowering.trace import META, POSITIONS, info

from .base import Pass, Target, VerifyError, require_legal
from .shard_tensor_parallel import check_stream_shapes

AXIS = cp_ops.CP_AXIS


def sequence_ops() -> dict:
    """Every kind's whole-sequence reference ops (parallelize facet ``sequence_ops``): op -> SequenceOp."""
    return {s.op: s for k in kinds.names() for s in kinds.facet(k, "parallelize").sequence_ops()}


def cp_comm(t: Target) -> str:
    return t.layout.cp_comm


def check_context_parallel(t: Target) -> None:
    """What the zigzag split needs (ir/legality.py: seq_len % 2cp, the all-to-all head split,
    the Mamba conv halo, learned positions), with the arithmetic when it does not hold; the
    names rows first (cp_comm picks the attention below)."""
    require_legal(t, "names", "context")


def _replace(gm, node, target, args) -> torch.fx.Node:
    """``target(*args, **node.kwargs)`` in place of ``node`` (keyword arguments such as an
    attention window carry over)."""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, args, dict(node.kwargs))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def _shard_input(gm, placeholder: torch.fx.Node, t: Target) -> None:
    """Slice right before the first use, so the slice sits in its user's pipeline stage (the
    labels' in the loss) also in graph order, as split_module's keep_original_order needs."""
    users = [n for n in gm.graph.nodes if n in placeholder.users]
    if not users:
        return
    if placeholder.target == POSITIONS:
        _shard_per_user(gm, placeholder, users, t)
        return
    with gm.graph.inserting_before(users[0]):
        local = gm.graph.call_function(cp_ops.zigzag_shard, (placeholder, t.layout.cp, t.cp_rank, 1))
    local.meta[META] = info(placeholder)
    placeholder.replace_all_uses_with(local, delete_user_cb=lambda user: user is not local)


def _shard_per_user(gm, placeholder: torch.fx.Node, users: list, t: Target) -> None:
    """A packed batch's positions are read by every attention layer, in every pipeline stage:
    each layer slices its own share (before its first reader, at its position), so no stage hands
    a slice to the next."""
    slices: dict[int, torch.fx.Node] = {}
    for user in users:
        layer = info(user).position
        if layer not in slices:
            with gm.graph.inserting_before(user):
                slices[layer] = gm.graph.call_function(
                    cp_ops.zigzag_shard, (placeholder, t.layout.cp, t.cp_rank, 1))
            slices[layer].meta[META] = replace(info(user), shape=info(placeholder).shape,
                                               dtype=info(placeholder).dtype)
        user.replace_input_with(placeholder, slices[layer])


def _rewrite(gm, node, op: SequenceOp, t: Target) -> None:
    cp, rank = t.layout.cp, t.cp_rank
    replacement = op.replacement[cp_comm(t)]
    if op.communicates:
        _replace(gm, node, replacement, (*node.args, AXIS, cp, rank))
    else:
        _replace(gm, node, replacement, (node.args[0], cp, rank))


def context_parallel(gm: torch.fx.GraphModule, t: Target) -> torch.fx.GraphModule:
    if t.layout.cp == 1:
        return gm
    check_context_parallel(t)
    ops = sequence_ops()
    for node in list(gm.graph.nodes):
        if node.op == "placeholder":
            _shard_input(gm, node, t)
        elif node.op == "call_function" and node.target in ops:
            _rewrite(gm, node, ops[node.target], t)
        elif node.op == "call_function" and node.target is torch.arange:
            raise LayoutError(f"{node.format_node()}: a position computed outside "
                              "sequence_positions cannot be split over cp")
    gm.graph.lint()
    gm.recompile()
    return gm


def verify_context_parallel(gm: torch.fx.GraphModule, t: Target) -> None:
    """No whole-sequence op is left; a fake run gives [mbs, seq / cp (/ tp with SP), hidden]
    on the residual stream."""
    if t.layout.cp == 1:
        return
    ops = sequence_ops()
    left = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ops]
    if left:
        raise VerifyError(f"{left[0].format_node()} still reads the whole sequence under cp = "
                          f"{t.layout.cp}")
    for node in gm.graph.nodes:  # tokens, labels (and a packed batch's positions)
        if node.op == "placeholder" and any(u.target is not cp_ops.zigzag_shard for u in node.users):
            raise VerifyError(f"input {node.name} is read whole under cp = {t.layout.cp}")
    seq_parts = t.layout.cp * (t.layout.tp if t.layout.sp else 1)
    check_stream_shapes(gm, t, seq_parts=seq_parts)


CONTEXT_PARALLEL = Pass(
    name="context_parallel", run=context_parallel, verify=verify_context_parallel,
    requires=("traced",), ensures=("context-parallel",),
    doc="zigzag sequence split; ring / all-to-all attention, Mamba conv halos and scan states")
