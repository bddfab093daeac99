"""Sharding states of values in a tensor-parallel graph, and the facts derived from them.

Every value is one of
  R  replicated:        identical on all TP ranks
  S  sequence-sharded:  split along the sequence dimension (sequence parallel regions)
  T  tensor-sharded:    split along a feature / head / vocabulary dimension
  P  partial:           a sum over TP ranks still to be reduced
Collectives and parallel linears change states; any other op keeps the one non-R state of its
inputs, and mixing two different non-R states is an error (the verifier reports it). A replicated
parameter that meets an S or T value receives only this rank's share of its gradient, so its
gradient must be summed over TP (norm weights under SP, per-head q/k norms).
"""
from __future__ import annotations

import torch
import torch.fx

from plait.lowering.collectives import COLLECTIVE_OPS

R, S, T, P = "R", "S", "T", "P"
ROLE = "plait.tp_role"  # node meta: "column", "row", "vocab_embed", "vocab_ce"

_COLLECTIVE_RULES = {  # op name -> (input state expected, output state)
    "copy_to_tp": (R, R), "reduce_from_tp": (P, R), "gather_seq": (S, R),
    "scatter_seq": (P, S), "max_over": (T, R),
}
_ROLE_RULES = {"column": (R, T), "row": (T, P), "vocab_embed": (R, P), "vocab_ce": (T, R)}


class ShardingConflict(ValueError):
    pass


def _input_states(node: torch.fx.Node, states: dict) -> set[str]:
    return {states[a] for a in node.all_input_nodes if a in states}


def _expect(node: torch.fx.Node, got: set[str], want: str) -> None:
    other = got - {R, want}
    if other or (want != R and want not in got):
        raise ShardingConflict(f"{node.format_node()}: expects a {want} input, got {sorted(got)}")


def _state_of(node: torch.fx.Node, states: dict) -> str:
    if node.op in ("placeholder", "get_attr"):
        return node.meta.get("plait.input_state", R)
    got = _input_states(node, states)
    rule = _COLLECTIVE_RULES.get(COLLECTIVE_OPS.get(node.target)) if node.op == "call_function" \
        else None
    rule = rule or _ROLE_RULES.get(node.meta.get(ROLE))
    if rule is not None:
        want, out = rule
        _expect(node, got, want)
        return out
    sharded = got - {R}
    if len(sharded) > 1:
        raise ShardingConflict(f"{node.format_node()} mixes states {sorted(sharded)}")
    return sharded.pop() if sharded else R


def propagate(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, str]:
    """The state of every node, in graph order; raises ShardingConflict on a mixed op."""
    states: dict[torch.fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op != "output":
            states[node] = _state_of(node, states)
    return states


def _param_targets(node: torch.fx.Node, gm: torch.fx.GraphModule) -> list[str]:
    if node.op == "get_attr":
        return [node.target]
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return [f"{node.target}.{n}" for n, _ in mod.named_parameters()]
    return []


def partial_grad_params(gm: torch.fx.GraphModule, states: dict, sharded: set[str]) -> list[str]:
    """Replicated parameters whose gradient is one TP rank's share (they need a TP sum): those
    consumed by S or T computations, and those of replicated computations that feed a T or S one
    without a collective between (multi-head latent attention's down-projections and latent norms:
    the heads each rank keeps send back only their part of the latent's gradient)."""
    params = dict(gm.named_parameters())
    feeds = _feeds_shard(gm, states)
    found: list[str] = []
    for node in gm.graph.nodes:
        if node.op == "output" or (states.get(node, R) not in (S, T) and node not in feeds):
            continue
        for arg in [node, *node.all_input_nodes]:
            for name in _param_targets(arg, gm):
                if name in params and name not in sharded and name not in found:
                    found.append(name)
    return found


def _feeds_shard(gm: torch.fx.GraphModule, states: dict) -> set:
    """Replicated nodes with a path to an S or T node that passes no collective."""
    feeds: set = set()
    for node in reversed(gm.graph.nodes):
        if states.get(node, R) != R or _is_collective(node):
            continue
        if any(not _is_collective(u) and (states.get(u, R) in (S, T) or u in feeds) for u in node.users):
            feeds.add(node)
    return feeds


def _is_collective(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and COLLECTIVE_OPS.get(node.target) is not None
