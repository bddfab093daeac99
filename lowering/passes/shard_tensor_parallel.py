"""Tensor parallelism (Megatron): column-parallel q/k/v/gate/up projections, row-parallel o/down
projections, a vocabulary-parallel embedding, LM head and cross entropy.

Which linears of a layer's mixer are column- or row-parallel is its block kind's plan
(``TensorParallelPlan`` from the kind's parallelize facet, plait/kinds/<kind>/parallelize.py); this
pass applies the plans and never names a kind. A mixer called as one module (the expert-parallel
MoE placed by dispatch_experts, which runs first) is no TP region: its plan's ``whole`` hook
shards what TP splits inside it (the shared expert).

Each layer's mixer and the LM head form a *TP region*: values entering it pass `copy_to_tp`
(identity forward, all-reduce of the gradient), values leaving a mixer pass `reduce_from_tp`
(all-reduce forward); a row-parallel bias is added after the reduction. Parameters are replaced by
this rank's slice; ``gm.meta["plait.shards"]`` records how (`ShardSpec`), by reference name.
Selection is by the C4 module names, never by shapes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from plait.ir import kinds
from plait.lowering import sharding, tp_ops
from plait.lowering.shard_plans import ParamSplit, TensorParallelPlan
from plait.lowering.trace import META, example_inputs, info, local_shape, record_shapes

from .base import Pass, Target, VerifyError, require_legal

SHARDS = "plait.shards"
AXIS = "tp"


@dataclass(frozen=True)
class ShardSpec:
    """A parameter split into ``parts`` along ``dim`` over mesh axis ``axis``; this rank holds
    part ``index``. With ``segments`` (logical sizes along ``dim``, e.g. Mamba's in_proj
    [z, x, B, C, dt]) each segment is chunked on its own and the rank's pieces concatenated."""

    axis: str
    dim: int
    parts: int
    index: int
    segments: tuple[int, ...] = ()

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's piece of the logical tensor ``full``."""
        pieces = full.split(list(self.segments), self.dim) if self.segments else (full,)
        return torch.cat([p.chunk(self.parts, self.dim)[self.index] for p in pieces], self.dim)

    def slices(self, full: tuple[int, ...]) -> tuple:
        """Index of this rank's piece in a tensor of shape ``full``: slices, with a list of slices
        (one per segment, read and concatenated) along ``dim`` for a segmented split."""
        bounds, start = [], 0
        for size in self.segments or (full[self.dim],):
            part = size // self.parts
            bounds.append(slice(start + self.index * part, start + (self.index + 1) * part))
            start += size
        along = bounds if self.segments else bounds[0]
        return tuple(along if d == self.dim else slice(None) for d in range(len(full)))

    def assemble(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """The logical tensor from every rank's piece, in index order (inverse of take)."""
        if not self.segments:
            return torch.cat(pieces, self.dim)
        local = [s // self.parts for s in self.segments]
        split = [p.split(local, self.dim) for p in pieces]
        return torch.cat([torch.cat([s[k] for s in split], self.dim)
                          for k in range(len(local))], self.dim)


def _shard_param(owner: nn.Module, name: str, dim: int, t: Target, shards: dict, path: str,
                 segments: tuple[int, ...] = ()):
    full = getattr(owner, name)
    if full is None:
        return
    spec = ShardSpec(AXIS, dim, t.layout.tp, t.tp_rank, segments)
    setattr(owner, name, nn.Parameter(spec.take(full.detach()).clone(),
                                      requires_grad=full.requires_grad))
    shards[f"{path}.{name}"] = spec


def _split_mixer(gm, node, splits: tuple[ParamSplit, ...], t, shards):
    """A leaf whose call shards its mixer's parameters (segmented, Mamba's in_proj: see the mamba
    kind's parallelize facet); the leaf itself then acts as a column-parallel linear."""
    mixer_path = node.target.rsplit(".", 1)[0]
    for split in splits:
        owner_path, _, leaf = f"{mixer_path}.{split.name}".rpartition(".")
        _shard_param(gm.get_submodule(owner_path), leaf, split.dim, t, shards, owner_path,
                     split.segments)
    node.meta[sharding.ROLE] = "column"


def _whole_mixer(gm, node, plan: TensorParallelPlan, t, shards):
    """A mixer called as one module: its kind's ``whole`` hook shards what TP splits inside it."""
    def shard(name: str, dim: int) -> None:
        owner_path, _, leaf = f"{node.target}.{name}".rpartition(".")
        _shard_param(gm.get_submodule(owner_path), leaf, dim, t, shards, owner_path)

    plan.whole(gm.get_submodule(node.target), node.target, shard, (AXIS, t.layout.tp))


def _new_node(gm, before, op_target, args, like: torch.fx.Node, role=None, scope=None):
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(op_target, args)
    node.meta[META] = replace(info(like), scope=scope or info(like).scope)
    if role:
        node.meta[sharding.ROLE] = role
    return node


def _get_attr(gm, before, target: str, like: torch.fx.Node) -> torch.fx.Node:
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(target)
    node.meta[META] = info(like)
    return node


def _column(gm, node, t, shards):
    mod = gm.get_submodule(node.target)
    _shard_param(mod, "weight", 0, t, shards, node.target)
    _shard_param(mod, "bias", 0, t, shards, node.target)
    node.meta[sharding.ROLE] = "column"


def _row(gm, node, t, shards):
    """nn.Linear -> F.linear(x, weight slice) without bias; the bias waits for the reduction."""
    mod = gm.get_submodule(node.target)
    _shard_param(mod, "weight", 1, t, shards, node.target)
    weight = _get_attr(gm, node, f"{node.target}.weight", node)
    linear = _new_node(gm, node, F.linear, (node.args[0], weight), node, role="row")
    linear.meta["plait.row_bias"] = f"{node.target}.bias" if mod.bias is not None else None
    node.replace_all_uses_with(linear)
    gm.graph.erase_node(node)


def _embedding(gm, node, t, shards):
    mod = gm.get_submodule(node.target)
    _shard_param(mod, "weight", 0, t, shards, node.target)
    weight = _get_attr(gm, node, f"{node.target}.weight", node)
    start = t.tp_rank * t.spec.vocab // t.layout.tp
    lookup = _new_node(gm, node, tp_ops.vocab_parallel_embedding, (node.args[0], weight, start),
                       node, role="vocab_embed")
    reduced = _new_node(gm, node, torch.ops.plait.reduce_from_tp.default,
                        (lookup, AXIS, t.layout.tp), node)
    node.replace_all_uses_with(reduced)
    gm.graph.erase_node(node)


def _cross_entropy(gm, node, t):
    kwargs = node.kwargs
    reduction = kwargs.get("reduction", "mean")
    if reduction not in ("mean", "none") or kwargs.get("label_smoothing", 0.0) != 0.0 \
            or kwargs.get("weight") is not None:
        raise VerifyError(f"vocab-parallel cross entropy supports the plain mean (or per-token) "
                          f"loss: {kwargs}")
    start = t.tp_rank * t.spec.vocab // t.layout.tp
    ce = _new_node(gm, node, tp_ops.vocab_parallel_cross_entropy,
                   (node.args[0], node.args[1], start, AXIS, t.layout.tp, reduction), node,
                   role="vocab_ce")
    node.replace_all_uses_with(ce)
    gm.graph.erase_node(node)


def _is_tied_head(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target is F.linear
            and getattr(node.args[1], "op", None) == "get_attr" and node.args[1].target == "embed.weight")


def _region(node: torch.fx.Node):
    """The TP region a node belongs to: a layer's mixer, the LM head, or none."""
    if node.op == "get_attr" or META not in node.meta:
        return None
    if _is_tied_head(node) or info(node).scope.split(".")[0] == "head":
        return "head"
    return info(node).mixer_scope


def _insert_entries(gm, t):
    """One copy_to_tp per (value, region) pair, placed before the value's first use inside."""
    entries: dict[tuple, torch.fx.Node] = {}
    for node in list(gm.graph.nodes):
        region = _region(node)
        if region is None or node.op == "output":
            continue
        for arg in list(node.all_input_nodes):
            # a model input read inside a region (a packed batch's positions) is replicated over
            # TP and carries no gradient: it needs no entry
            if arg.op in ("get_attr", "placeholder") or _region(arg) == region:
                continue
            key = (arg, region)
            if key not in entries:
                entries[key] = _new_node(gm, node, torch.ops.plait.copy_to_tp.default,
                                         (arg, AXIS, t.layout.tp), node, scope=region)
                entries[key].meta[META] = replace(info(node), scope=region, shape=info(arg).shape)
            node.replace_input_with(arg, entries[key])


def _insert_exits(gm, t):
    """reduce_from_tp after each mixer's row-parallel output, then its bias."""
    for node in list(gm.graph.nodes):
        region = _region(node)
        if region is None or region == "head" or node.op == "output":
            continue
        outside = [u for u in node.users if _region(u) != region]
        if not outside:
            continue
        if node.meta.get(sharding.ROLE) != "row":
            raise VerifyError(f"{node.format_node()} leaves TP region {region} but is not a "
                              "row-parallel projection")
        after = node.next
        out = _new_node(gm, after, torch.ops.plait.reduce_from_tp.default,
                        (node, AXIS, t.layout.tp), node, scope=region)
        if node.meta.get("plait.row_bias"):
            bias = _get_attr(gm, after, node.meta["plait.row_bias"], node)
            out = _new_node(gm, after, torch.add, (out, bias), node, scope=region)
        for user in outside:
            user.replace_input_with(node, out)


def _plan_of(node: torch.fx.Node, plans: dict) -> TensorParallelPlan:
    """The TP plan of the layer kind a node belongs to (none outside the layers)."""
    i = node.meta.get(META)
    return plans[i.kind] if i is not None and i.layer is not None else TensorParallelPlan()


def _calls_whole_mixer(node: torch.fx.Node) -> bool:
    return node.target == f"layers.{info(node).layer}.mixer"


def shard_tensor_parallel(gm: torch.fx.GraphModule, t: Target) -> torch.fx.GraphModule:
    shards: dict[str, ShardSpec] = {}
    gm.meta[SHARDS] = shards
    if t.layout.tp == 1:
        return gm
    require_legal(t, "tensor")  # every dimension TP splits divides by tp (ir/legality.py)
    plans = {k: kinds.facet(k, "parallelize").tensor_parallel(t.spec) for k in set(t.spec.layers)}
    for node in list(gm.graph.nodes):
        leaf = str(node.target).rsplit(".", 1)[-1]
        plan = _plan_of(node, plans)
        if node.op == "call_module" and plan.whole is not None and _calls_whole_mixer(node):
            _whole_mixer(gm, node, plan, t, shards)
        elif node.op == "call_module" and leaf in plan.split_on:
            _split_mixer(gm, node, plan.split_on[leaf], t, shards)
        elif node.op == "call_module" and (leaf in plan.column or leaf == "head"):
            _column(gm, node, t, shards)
        elif node.op == "call_module" and leaf in plan.row:
            _row(gm, node, t, shards)
        elif node.op == "call_module" and node.target == "embed":
            _embedding(gm, node, t, shards)
        elif _is_tied_head(node):
            node.meta[sharding.ROLE] = "column"
        elif node.op == "call_function" and node.target is F.cross_entropy:
            _cross_entropy(gm, node, t)
    _insert_entries(gm, t)
    _insert_exits(gm, t)
    gm.graph.lint()
    gm.recompile()
    return gm


def verify_tensor_parallel(gm: torch.fx.GraphModule, t: Target) -> None:
    """States are consistent and the loss replicated; every shard has its local shape; a fake
    run over one micro-batch reproduces the logical residual-stream shapes."""
    states = sharding.propagate(gm)
    loss = gm.graph.find_nodes(op="output")[0].all_input_nodes[0]
    if states[loss] != sharding.R:
        raise VerifyError(f"the loss is {states[loss]} on TP ranks, not replicated")
    params = dict(gm.named_parameters())
    for name, s in gm.meta.get(SHARDS, {}).items():
        if params[name].shape[s.dim] * s.parts != _logical_dim(gm, name, s):
            raise VerifyError(f"{name}: local shape {tuple(params[name].shape)} is not 1/{s.parts} "
                              f"of the logical one along dim {s.dim}")
    check_stream_shapes(gm, t)


def _logical_dim(gm, name: str, s: ShardSpec) -> int:
    return gm.meta["plait.logical_shapes"][name][s.dim]


def check_stream_shapes(gm: torch.fx.GraphModule, t: Target, seq_parts: int = 1) -> None:
    """Fake-run one micro-batch; every layer output must be [mbs, seq / seq_parts, hidden]."""
    mbs, seq = t.micro_batch
    record_shapes(gm, *example_inputs(gm, mbs, seq))
    want = (mbs, seq // seq_parts, t.spec.hidden)
    for node in gm.graph.nodes:
        i = node.meta.get(META)
        if i is not None and i.layer is not None and i.scope == f"layers.{i.layer}" \
                and node.users and any(info(u).position != i.position for u in node.users
                                       if META in u.meta):
            if local_shape(node) != want:
                raise VerifyError(f"layer {i.layer} outputs {local_shape(node)}, expected {want}")


SHARD_TENSOR_PARALLEL = Pass(
    name="shard_tensor_parallel", run=shard_tensor_parallel, verify=verify_tensor_parallel,
    requires=("traced",), ensures=("tensor-parallel",),
    doc="column/row-parallel projections, vocab-parallel embedding, head and cross entropy")
