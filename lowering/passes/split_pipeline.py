"""Pipeline split: torch.fx split_module by the plan's stage partition.

Chunk c of the plan (layers [first, last), sorted by first layer) becomes child ``stage{c}``; the
embedding joins chunk 0, final norm and LM head join the last chunk, and the cross entropy becomes
its own child ``loss`` (the pipeline schedule's loss_fn, fed the labels). Chunks may hold unequal
layer counts; with vpp > 1 rank r runs chunks r, r + pp, ... (the interleaved assignment torch's
schedules expect). The result is a GraphModule whose forward chains the children and equals the
unsplit program; every child keeps the reference parameter names. A tied LM head gets its own copy
of the embedding weight on the last stage (Megatron's embedding group keeps the copies equal).
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx
from torch import nn
from torch.fx.passes.split_module import split_module

from plait.ir.errors import LayoutError
from plait.ir.plan import Stage
from plait.lowering.trace import POSITIONS, example_inputs, info, local_shape, record_shapes

from .base import Pass, Target, VerifyError
from .data_parallel import GRAD_SYNC, GradSync

TIED_WEIGHT = "embed.weight"  # the input embedding, the LM head's weight when tied

STAGE_IO = "plait.stage_io"
LOSS = "loss"
# A child's inputs in this order: the activation it receives (or the tokens), then the model
# inputs every stage may read by name (a document-masked program's positions, a kwarg of every
# stage), the labels last: loss_fn(output, target).
_INPUT_ORDER = {"tokens": 1, POSITIONS: 2, "labels": 3}


def stage_name(chunk: int) -> str:
    return f"stage{chunk}"


def ordered_chunks(t: Target) -> list[Stage]:
    """The plan's stages in layer order, checked to tile the model and follow the interleaved
    rank assignment (chunk c on pp rank c % pp)."""
    chunks = sorted(t.plan.stages, key=lambda s: s.first)
    L, pp, vpp = t.spec.num_layers, t.layout.pp, t.layout.vpp
    if len(chunks) != pp * vpp:
        raise LayoutError(f"the plan has {len(chunks)} stages, but pp*vpp = {pp}*{vpp} = {pp * vpp}")
    edges = [0] + [s.last for s in chunks]
    if [s.first for s in chunks] != edges[:-1] or edges[-1] != L or any(s.num_layers < 1 for s in chunks):
        raise LayoutError(f"stages {[(s.first, s.last) for s in chunks]} must tile layers [0, {L}) "
                          "contiguously with at least one layer each")
    for c, s in enumerate(chunks):
        if (s.pp_rank, s.virtual) != (c % pp, c // pp):
            raise LayoutError(f"stage {c} (layers {s.first}..{s.last - 1}) sits on pp rank "
                              f"{s.pp_rank} virtual {s.virtual}; the schedules need rank {c % pp} "
                              f"virtual {c // pp} (chunk c on rank c % pp)")
    return chunks


def _chunk_of(position: int, chunks: list[Stage], num_layers: int) -> int:
    if position < 0:
        return 0
    if position > num_layers:
        return len(chunks)  # the loss
    if position == num_layers:
        return len(chunks) - 1
    return next(c for c, s in enumerate(chunks) if s.first <= position < s.last)


def _child(gm, split, call: torch.fx.Node, qualnames: dict[str, str]) -> torch.fx.GraphModule:
    """Rebuild one split child over the original module tree: parameters it was passed as inputs
    become its own get_attr nodes again, flattened module names get their reference names back."""
    sub = split.get_submodule(call.target)
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    pairs = sorted(zip(placeholders, call.args), key=lambda pa: _INPUT_ORDER.get(
        pa[1].target, 0) if pa[1].op == "placeholder" else 0)
    for ph, arg in pairs:
        env[ph] = graph.get_attr(arg.target) if arg.op == "get_attr" else graph.placeholder(ph.name)
    call.args = tuple(arg for _, arg in pairs)
    for node in sub.graph.nodes:
        if node.op == "placeholder":
            continue
        new = graph.node_copy(node, lambda n: env[n])
        if node.op == "call_module":
            new.target = qualnames.get(f"{call.target}.{node.target}", node.target)
        env[node] = new
    return torch.fx.GraphModule(gm, graph, class_name=call.target)


def split_pipeline(gm: torch.fx.GraphModule, t: Target) -> torch.fx.GraphModule:
    chunks = ordered_chunks(t)
    L = t.spec.num_layers
    if t.spec.tie_embeddings and len(chunks) > 1 and t.layout.pp == 1:
        raise LayoutError(f"tied embeddings need the first and last of the {len(chunks)} stages on "
                          "different pipeline ranks", hint="use vpp = 1 with pp = 1")
    qualnames: dict[str, str] = {}
    split = split_module(gm, gm, lambda n: _chunk_of(info(n).position, chunks, L), qualnames,
                         keep_original_order=True, keep_original_node_name=True)
    root = nn.Module()
    for call in [n for n in split.graph.nodes if n.op == "call_module"]:
        index = int(call.target.removeprefix("submod_"))
        name = LOSS if index == len(chunks) else stage_name(index)
        root.add_module(name, _child(gm, split, call, qualnames))
        call.target = name
        call.args = tuple(a for a in call.args if a.op != "get_attr")
    for node in reversed(list(split.graph.nodes)):
        if node.op == "get_attr" and not node.users:
            split.graph.erase_node(node)
    pipe = torch.fx.GraphModule(root, split.graph, class_name="Pipeline")
    pipe.meta.update({k: v for k, v in gm.meta.items() if k.startswith("plait.")})
    pipe.meta["plait.chunks"] = tuple(chunks)
    if t.spec.tie_embeddings and len(chunks) > 1:
        _untie_head(pipe, stage_name(len(chunks) - 1))
    return pipe


def _untie_head(pipe: torch.fx.GraphModule, last: str) -> None:
    """Megatron's tied embedding across pipeline stages: the last stage's head gets its own copy of
    the embedding weight (same name, same values); the runtime sums the two copies' gradients over
    the embedding group (first and last pp rank), so both take identical steps."""
    owner = pipe.get_submodule(f"{last}.embed")
    owner.weight = nn.Parameter(owner.weight.detach().clone(), requires_grad=owner.weight.requires_grad)
    sync: GradSync = pipe.meta[GRAD_SYNC]
    pipe.meta[GRAD_SYNC] = replace(sync, embedding_sum=sync.embedding_sum + (TIED_WEIGHT,))


def verify_split_pipeline(pipe: torch.fx.GraphModule, t: Target) -> None:
    """One tensor in, one tensor out per stage; the loss takes (logits, labels); parameters are
    disjoint across stages; a fake run records each stage's boundary shapes for the runtime."""
    chunks = pipe.meta["plait.chunks"]
    calls = [n for n in pipe.graph.nodes if n.op == "call_module"]
    names = [stage_name(c) for c in range(len(chunks))] + [LOSS]
    if [n.target for n in calls] != names:
        raise VerifyError(f"pipeline children {[n.target for n in calls]}, expected {names}")
    for call in calls[:-1]:
        flowing = [a for a in call.args if not _is_positions(a)]
        if len(flowing) != 1 or any(u.op == "call_function" for u in call.users):
            raise VerifyError(f"{call.target} must take and return exactly one tensor (besides "
                              f"the document positions), takes {len(flowing)}")
    if len(calls[-1].args) != 2:
        raise VerifyError(f"loss takes {len(calls[-1].args)} inputs, expected (logits, labels)")
    seen: dict[int, str] = {}
    for name in names:
        for p in pipe.get_submodule(name).parameters():
            if id(p) in seen:
                raise VerifyError(f"a parameter is shared by {seen[id(p)]} and {name}")
            seen[id(p)] = name
    record_shapes(pipe, *example_inputs(pipe, *t.micro_batch))
    inputs = [a for a in pipe.graph.nodes if a.op == "placeholder"]
    io = {}
    for call in calls[:-1]:
        src = call.args[0]
        io[call.target] = (local_shape(src), _dtype(src), local_shape(call), _dtype(call))
    io[LOSS] = (local_shape(calls[-1].args[0]), _dtype(calls[-1].args[0]), (), "torch.float32")
    if inputs[0] is not calls[0].args[0]:
        raise VerifyError("stage0 must read the tokens")
    pipe.meta[STAGE_IO] = io


def _is_positions(node: torch.fx.Node) -> bool:
    return node.op == "placeholder" and node.target == POSITIONS


def _dtype(node: torch.fx.Node):
    tm = node.meta.get("tensor_meta")
    return tm.dtype if tm is not None else None


SPLIT_PIPELINE = Pass(
    name="split_pipeline", run=split_pipeline, verify=verify_split_pipeline,
    requires=("traced", "grad-sync"), ensures=("pipeline-split",),
    doc="fx split_module by the plan's (possibly unequal, virtual) stages, loss as its own child")
