"""Expert parallelism with MoE Parallel Folding: every MoE layer's reference mixer becomes an
`ExpertParallelMoE` holding this rank's EP x ETP shard of the experts, with a token dispatcher
between the attention layout (TP x CP x DP) and the expert layout (ETP x EP x EDP).

Re-laying activations: every rank routes the tokens it holds in the attention layout. Under
sequence parallelism those are [mbs, seq / tp, hidden] -- distinct tokens on every rank of the
stage -- so entering the expert layout is a reshape to [tokens, hidden] and the dispatcher's
collectives (all-to-all over EP, all-gather-v / reduce-scatter-v over ETP, or all-gather over
ETP x EP) do the rest, whichever ranks the EP and ETP groups fold onto. Without sequence
parallelism TP ranks would hold the same tokens twice; Megatron-Core requires sequence parallelism
with MoE and TP > 1, and so does this pass.

Context parallelism folds the same way: a CP rank holds its two zigzag chunks of every sequence
([mbs, seq / cp (/ tp), hidden]), distinct tokens again, so EP (and ETP) groups may span CP ranks
and the dispatcher moves those tokens like any others. What CP changes is the aux loss (its token
counts are summed over TP x CP, its gradient share scaled for the DP x CP average, see
`ExpertParallelMoE`) and capacity: it applies to a rank's local tokens, i.e. to its two
non-contiguous chunks together (the reference's ``capacity_cp``).

The pass runs first (before tensor parallelism): the new mixer node sits in its layer's scope, not
a TP region. It records `ExpertSync` in ``gm.meta["plait.experts"]``: the expert parameters, whose
gradients are summed over EDP (never over TP or DP), for the data-parallel pass and the runtime.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx

from plait.ir import kinds
from plait.ir.job import MoEOptions
from plait.ir.model import ModelSpec
from plait.lowering.moe import EXPERT_PARAMS, ExpertGrid, ExpertParallelMoE
from plait.lowering.moe.sync import EXPERTS, ExpertSync
from plait.lowering.trace import META, NodeInfo, info
from plait.planner.groups import group_of

from .base import Pass, Target, VerifyError, require_legal
from .shard_tensor_parallel import check_stream_shapes


def expert_grid(t: Target) -> ExpertGrid:
    """This rank's EP x ETP coordinates (Megatron-Core's expert rank generator)."""
    ep_group = group_of(t.layout, "expert", "ep", t.rank)
    etp_group = group_of(t.layout, "expert", "etp", t.rank)
    return ExpertGrid(experts=t.spec.moe.experts, ep=t.layout.ep, etp=t.layout.etp,
                      ep_rank=ep_group.index(t.rank), etp_rank=etp_group.index(t.rank))


def moe_options(t: Target) -> MoEOptions:
    """The job's capacity / drop / padding options (the plan carries them); the dispatcher is the
    layout's."""
    options = t.plan.moe or MoEOptions()
    return replace(options, dispatcher=t.layout.dispatcher)


def _mixer_nodes(gm: torch.fx.GraphModule, path: str) -> list[torch.fx.Node]:
    """The reference mixer's nodes: inlined (its scope) or one leaf call, plus its get_attrs."""
    return [n for n in gm.graph.nodes
            if (META in n.meta and info(n).mixer_scope == path and n.op != "output")
            or (n.op == "get_attr" and str(n.target).startswith(path + "."))]


def _replace_mixer(gm: torch.fx.GraphModule, layer: int, module: ExpertParallelMoE) -> None:
    path = f"layers.{layer}.mixer"
    nodes = _mixer_nodes(gm, path)
    inside = set(nodes)
    entries = {a for n in nodes for a in n.all_input_nodes if a not in inside}
    exits = [n for n in nodes if any(u not in inside for u in n.users)]
    if len(entries) != 1 or len(exits) != 1:
        raise VerifyError(f"{path}: expected one input and one output, found "
                          f"{len(entries)} and {len(exits)}")
    gm.get_submodule(f"layers.{layer}").mixer = module
    with gm.graph.inserting_before(exits[0]):
        call = gm.graph.call_module(path, (entries.pop(),))
    out = info(exits[0])
    call.meta[META] = NodeInfo(scope=f"layers.{layer}", position=layer, kind=info(exits[0]).kind,
                               shape=out.shape, dtype=out.dtype)
    exits[0].replace_all_uses_with(call)
    for node in reversed(nodes):
        gm.graph.erase_node(node)


def expert_layers(spec: ModelSpec) -> list[int]:
    """Layers whose kind routes tokens to experts (parallelize facet ``routed_experts``)."""
    routed = {k for k in set(spec.layers) if kinds.facet(k, "parallelize").routed_experts()}
    return [i for i, kind in enumerate(spec.layers) if kind in routed]


def dispatch_experts(gm: torch.fx.GraphModule, t: Target) -> torch.fx.GraphModule:
    layers = expert_layers(t.spec)
    gm.meta[EXPERTS] = ExpertSync()
    if not layers:
        return gm
    require_legal(t, "experts")  # experts % ep, ffn % etp, SP with TP, FSDP over edp
    grid, options = expert_grid(t), moe_options(t)
    lay = t.layout
    token_axes = tuple(a for a in ("tp", "cp") if getattr(lay, a) > 1)  # the ranks splitting a call
    params = []
    for i in layers:
        ref = gm.get_submodule(f"layers.{i}.mixer")
        module = ExpertParallelMoE.from_reference(ref, grid, options, token_axes=token_axes,
                                                  token_parts=lay.tp * lay.cp, averaged_parts=lay.cp)
        _replace_mixer(gm, i, module)
        params += [f"layers.{i}.mixer.{name}" for name in EXPERT_PARAMS]
    gm.meta[EXPERTS] = ExpertSync(params=tuple(params), grid=grid, edp=lay.edp,
                                  dp_cp=lay.dp * lay.cp, gated=t.spec.moe.activation == "swiglu")
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def verify_dispatch_experts(gm: torch.fx.GraphModule, t: Target) -> None:
    """Every MoE mixer is expert-parallel with this rank's shard shapes and is called once; the
    residual stream keeps its shape."""
    sync: ExpertSync = gm.meta[EXPERTS]
    moe = t.spec.moe
    calls = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    params = dict(gm.named_parameters())
    for i in expert_layers(t.spec):
        path = f"layers.{i}.mixer"
        if not isinstance(gm.get_submodule(path), ExpertParallelMoE) or path not in calls:
            raise VerifyError(f"{path} is not an expert-parallel MoE called from the graph")
        rows = (2 if moe.activation == "swiglu" else 1) * moe.ffn // t.layout.etp
        want = (moe.experts // t.layout.ep, rows, t.spec.hidden)
        got = tuple(params[f"{path}.experts.w_gate_up"].shape)
        if got != want:
            raise VerifyError(f"{path}.experts.w_gate_up is {got}, expected this rank's shard {want}")
    if set(sync.params) - set(params):
        raise VerifyError(f"expert parameters missing from the graph: {set(sync.params) - set(params)}")
    check_stream_shapes(gm, t)


DISPATCH_EXPERTS = Pass(
    name="dispatch_experts", run=dispatch_experts, verify=verify_dispatch_experts,
    requires=("traced",), ensures=("experts-dispatched",),
    doc="MoE mixers -> this rank's EP x ETP expert shard behind a token dispatcher (folding)")
