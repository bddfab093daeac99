"""torch.fx tracing of the reference model into a GraphModule whose nodes carry typed meta.

Every node gets ``node.meta["plait"] = NodeInfo(...)``: the module scope it came from, the model
position it belongs to (embedding, layer i, head, loss), the layer's block kind, and the logical
(unsharded) shape of the value it computes. Later passes shard and split by these facts instead of
by node names.

Positions: -1 is the embedding, 0..L-1 the layers, L the head (final norm + LM head), L+1 the loss.
A node outside any module scope (residual adds at top level, the cross entropy) takes the latest
position among its inputs; the `labels` input sits at the loss position.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from plait.ir import kinds
from plait.ir.model import ModelSpec

from . import trace_cache

META = "plait"
EMBED, HEAD, LOSS = "embed", "head", "loss"
POSITIONS = "positions"  # a document-masked model's third input (per-document positions)


@dataclass(frozen=True)
class NodeInfo:
    scope: str  # innermost module path ("layers.3.mixer.q_proj"), "" at top level
    position: int  # -1 embed, 0..L-1 layer, L head, L+1 loss
    kind: str  # "embed", a block kind ("attention", "mlp", ...), "head" or "loss"
    shape: Optional[tuple[int, ...]] = None  # logical shape of a tensor value
    dtype: Optional[str] = None

    @property
    def layer(self) -> Optional[int]:
        return self.position if self.kind not in (EMBED, HEAD, LOSS) else None

    @property
    def mixer_scope(self) -> Optional[str]:
        """"layers.i.mixer" when the node belongs to a layer's mixer (the tensor-parallel region)."""
        parts = self.scope.split(".")
        if len(parts) >= 3 and parts[0] == "layers" and parts[2] == "mixer":
            return ".".join(parts[:3])
        return None


def info(node: torch.fx.Node) -> NodeInfo:
    return node.meta[META]


def _scope(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else str(path)


def _scope_position(scope: str, num_layers: int) -> Optional[int]:
    head = scope.split(".")[0]
    if head in ("embed", "pos_embed"):
        return -1
    if head in ("final_norm", "head"):
        return num_layers
    if head == "layers":
        return int(scope.split(".")[1])
    return None


def _kind(position: int, spec: ModelSpec) -> str:
    if position < 0:
        return EMBED
    if position >= spec.num_layers + 1:
        return LOSS
    if position == spec.num_layers:
        return HEAD
    return spec.layers[position]


def annotate(gm: torch.fx.GraphModule, spec: ModelSpec) -> None:
    """Attach NodeInfo (without shapes) to every node, in graph order."""
    last = spec.num_layers + 1
    for node in gm.graph.nodes:
        scope = _scope(node)
        position = _scope_position(scope, spec.num_layers)
        if position is None:
            if node.op == "placeholder":
                position = last if node.target == "labels" else -1
            elif node.op == "output":
                position = last
            else:
                inputs = [info(a).position for a in node.all_input_nodes]
                position = max(inputs, default=-1)
        node.meta[META] = NodeInfo(scope=scope, position=position, kind=_kind(position, spec))
    _sink_into_loss(gm, spec)


def _sink_into_loss(gm: torch.fx.GraphModule, spec: ModelSpec) -> None:
    """Top-level glue used only by the loss (flatten / upcast of the logits) belongs to the loss,
    so the last stage hands over the head's own output. A node that reads a parameter is no glue
    (the tied head's F.linear on embed.weight stays with the head)."""
    last = spec.num_layers + 1
    for node in reversed(list(gm.graph.nodes)):
        users = list(node.users)
        reads_weight = any(a.op == "get_attr" for a in node.all_input_nodes)
        if node.op in ("call_function", "call_method") and not info(node).scope and users \
                and not reads_weight and all(info(u).position == last for u in users):
            node.meta[META] = NodeInfo(scope="", position=last, kind=LOSS)


@functools.cache
def _whole_types() -> tuple[type, ...]:
    return tuple(t for k in kinds.names() for t in kinds.facet(k, "module").traced_whole())


def _traced_whole(module: torch.nn.Module) -> bool:
    """A mixer its kind keeps as one node (module facet ``traced_whole``: the reference MoE mixer,
    whose routing decides shapes)."""
    return isinstance(module, _whole_types())


class _Tracer(torch.fx.Tracer):
    """Keeps each mixer its kind names in ``traced_whole`` one call_module node (the reference MoE
    mixer: its routing is data-dependent, token counts decide shapes, so it can neither be
    fake-run nor sharded node by node; the dispatch_experts pass replaces the whole node). Buffers (RoPE's inv_freq) are read as
    attributes, not baked into the graph as constants computed at trace time: the graph then
    depends on the model's structure only, and a cached trace can be re-bound to another model."""

    proxy_buffer_attributes = True

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return _traced_whole(m) or super().is_leaf_module(m, qualname)


class _ShapeProp(ShapeProp):
    def call_module(self, target, args, kwargs):
        if _traced_whole(self.fetch_attr(target)):  # [..., hidden] -> [..., hidden]
            return torch.empty_like(args[0])
        return super().call_module(target, args, kwargs)


def record_shapes(gm: torch.fx.GraphModule, *example) -> None:
    """ShapeProp on the meta device: every tensor node gets ``meta["tensor_meta"]`` (its local
    shape in this graph as it is now). The graph runs on meta twins of its parameters, buffers and
    inputs (``functional_call`` swaps them in for the run and back): meta kernels compute shapes
    natively, where a FakeTensorMode run dispatched every op through Python (~3x slower for a whole
    compile). An identical graph propagated before (another rank's, another compile's) replays its
    metadata instead (`trace_cache.shapes_recorded`)."""

    def propagate() -> None:
        runner = _Propagate(gm)
        twins = {f"gm.{n}": _meta_twin(t) for n, t in
                 [*gm.named_parameters(remove_duplicate=False),
                  *gm.named_buffers(remove_duplicate=False)]}
        torch.func.functional_call(runner, twins, tuple(_meta_twin(t) for t in example),
                                   tie_weights=True, strict=True)

    trace_cache.shapes_recorded(gm, example, propagate)


class _Propagate(torch.nn.Module):
    """Holds ``gm`` so that ``functional_call`` can swap its tensors; its forward is ShapeProp."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, *example) -> None:
        _ShapeProp(self.gm).propagate(*example)


def _meta_twin(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, device="meta").requires_grad_(t.requires_grad)


def local_shape(node: torch.fx.Node) -> Optional[tuple[int, ...]]:
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if isinstance(tm, TensorMetadata) else None


def _record_logical_shapes(gm: torch.fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        tm = node.meta.get("tensor_meta")
        if isinstance(tm, TensorMetadata):
            node.meta[META] = _with_shape(info(node), tuple(tm.shape), str(tm.dtype))
    gm.meta["plait.logical_shapes"] = {n: tuple(p.shape) for n, p in gm.named_parameters()}


def _with_shape(i: NodeInfo, shape: tuple[int, ...], dtype: str) -> NodeInfo:
    return NodeInfo(scope=i.scope, position=i.position, kind=i.kind, shape=shape, dtype=dtype)


def example_inputs(gm: torch.fx.GraphModule, batch: int, seq: int) -> tuple[torch.Tensor, ...]:
    """A [batch, seq] int64 zero tensor for each input of ``gm`` (tokens, labels and, in a
    document-masked program, positions: all zero, every token its own document)."""
    return tuple(torch.zeros(batch, seq, dtype=torch.long)
                 for n in gm.graph.nodes if n.op == "placeholder")


def trace_model(model: torch.nn.Module, spec: ModelSpec, batch: int = 1,
                seq: int = 8) -> torch.fx.GraphModule:
    """Trace ``model(tokens, labels) -> loss`` and annotate it (scopes, positions, kinds, shapes
    for a [batch, seq] micro-batch)."""
    return trace_cache.traced(model, (spec, batch, seq), lambda: _trace(model, spec, batch, seq))


def _trace(model: torch.nn.Module, spec: ModelSpec, batch: int, seq: int) -> torch.fx.GraphModule:
    gm = torch.fx.GraphModule(model, _Tracer().trace(model), model.__class__.__name__)
    gm.graph.eliminate_dead_code()
    for node in list(gm.graph.nodes):  # an input the model ignores (positions without masking)
        if node.op == "placeholder" and not node.users and node.target not in ("tokens", "labels"):
            gm.graph.erase_node(node)
    gm.recompile()
    annotate(gm, spec)
    record_shapes(gm, *example_inputs(gm, batch, seq))
    _record_logical_shapes(gm)
    gm.meta["plait.spec"] = spec
    gm.meta["plait.facts"] = {"traced"}
    gm.meta["plait.micro_batch"] = (batch, seq)
    return gm
