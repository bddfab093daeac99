"""Activation recompute: the plan's per-stage ``recompute`` ("none" | "selective" | "full").

In a stage that recomputes, every layer's nodes move into a child GraphModule
(``recompute.layer{i}``, built over the stage's own module tree, so parameters keep their
reference names) and the stage calls it through ``checkpointed(region, mode, *inputs)``, which is
torch.utils.checkpoint (non-reentrant):

  full       only the layer's input is kept; backward re-runs the whole layer, its TP / SP
             collectives included (Megatron's full, per-layer recompute)
  selective  the same region under a selective-checkpoint policy: the outputs of compute-heavy ops
             (matmuls, convolutions, grouped GEMMs) and of every collective or communicating op
             (`plait::`, functional collectives) are kept; everything else, the attention core
             (SDPA / softmax), norms, RoPE and activation functions, is recomputed in backward
             (Korthikanti et al.'s selective recompute, spelled with torch's selective activation
             checkpointing; nothing communicates twice)

Under FSDP (dp_kind fsdp) every layer of every stage is such a child module, the FSDP unit the
runtime shards (runtime/fsdp.py): a stage that does not recompute calls its layers plainly
(``fsdp_units.layer{i}``). A region holds its layer's own module (``layers.{i}``, shared with the
stage), so every parameter of the layer, those the graph reads by attribute (norm weights, Mamba's
A_log) included, lies inside the one module whose forward hooks fire when the layer runs.

Embedding, final norm, head and loss are never recomputed. What runs at training time (the
`checkpointed` call, the selective policy, `is_recomputing()` for stateful ops such as MoE
expert-load counters) lives in `plait.lowering.recompute`, which imports nothing but torch.
"""
from __future__ import annotations

import operator

import torch.fx
from torch import nn

from plait.ir.errors import LayoutError
from plait.ir.plan import RECOMPUTE
from plait.lowering.recompute import checkpointed
from plait.lowering.trace import info
from plait.planner.layouts import units

from .base import Pass, Target, VerifyError
from .split_pipeline import stage_name

REGIONS = "recompute"  # the child module holding a stage's region GraphModules
UNITS = "fsdp_units"  # the child holding the plainly called layer modules of an FSDP stage
FSDP_GROUPS = "plait.fsdp_units"  # stage GraphModule meta: layer indices of each FSDP unit
RECOMPUTED = "plait.recompute"  # stage GraphModule meta: {"mode": ..., "layers": (...)}


def stage_mode(t: Target, chunk: int) -> str:
    """The recompute option of chunk ``chunk`` (plan stages in layer order)."""
    stages = sorted(t.plan.stages, key=lambda s: s.first)
    mode = stages[chunk].recompute
    if mode not in RECOMPUTE:
        raise LayoutError(f"stage {chunk} asks for recompute {mode!r}; expected one of "
                          f"{', '.join(RECOMPUTE)}")
    return mode


# ---- region extraction --------------------------------------------------------------------------
def _layer_regions(gm: torch.fx.GraphModule) -> dict[int, list[torch.fx.Node]]:
    """Layer index -> its computing nodes, in graph order."""
    regions: dict[int, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module") and "plait" in node.meta \
                and info(node).layer is not None:
            regions.setdefault(info(node).layer, []).append(node)
    return regions


def _boundary(nodes: list[torch.fx.Node]) -> tuple[list[torch.fx.Node], list[torch.fx.Node]]:
    """(values the region reads from outside, excluding attributes; values it hands outside)."""
    inside = set(nodes)
    inputs, outputs = [], []
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in inside and arg.op != "get_attr" and arg not in inputs:
                inputs.append(arg)
        if any(u not in inside for u in node.users):
            outputs.append(node)
    return inputs, outputs


def _region_graph(nodes, inputs, outputs) -> torch.fx.Graph:
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for arg in inputs:
        env[arg] = graph.placeholder(arg.name)
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and arg not in env:
                env[arg] = graph.get_attr(arg.target)
        env[node] = graph.node_copy(node, lambda n: env[n])
    result = env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs)
    graph.output(result)
    return graph


def _check_contiguous(gm, nodes, outputs) -> None:
    """No outside node may sit between the region's nodes and use one of its values."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last = order[nodes[-1]]
    inside = set(nodes)
    for out in outputs:
        early = [u for u in out.users if u not in inside and order[u] < last]
        if early:
            raise VerifyError(f"recompute region of {nodes[0].name}..{nodes[-1].name} is not "
                              f"contiguous: {early[0].name} uses {out.name} inside it")


def _hold_layer(region: torch.fx.GraphModule, gm: torch.fx.GraphModule, layer: int) -> None:
    """Let the region reach its layer through the stage's own ``layers.{layer}`` module (not
    through copies of the containers on the way), when every target it names lies inside it."""
    prefix = f"layers.{layer}."
    targets = [n.target for n in region.graph.nodes if n.op in ("call_module", "get_attr")]
    if not targets or not all(t.startswith(prefix) for t in targets):
        return
    holder = nn.Module()
    holder.add_module(str(layer), gm.get_submodule(f"layers.{layer}"))
    region.layers = holder


def extract_region(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], name: str,
                   mode: str, layer: int | None = None) -> None:
    """Move ``nodes`` into child ``recompute.{name}`` and call it through `checkpointed`; mode
    "none": into ``fsdp_units.{name}``, called plainly."""
    inputs, outputs = _boundary(nodes)
    _check_contiguous(gm, nodes, outputs)
    region = torch.fx.GraphModule(gm, _region_graph(nodes, inputs, outputs), class_name=name)
    if layer is not None:
        _hold_layer(region, gm, layer)
    holder = UNITS if mode == "none" else REGIONS
    if not hasattr(gm, holder):
        gm.add_module(holder, nn.Module())  # registered after the stage's own children
    gm.get_submodule(holder).add_module(name, region)
    if mode == "none":
        with gm.graph.inserting_after(nodes[-1]):
            call = gm.graph.call_module(f"{holder}.{name}", tuple(inputs))
    else:
        with gm.graph.inserting_after(nodes[-1]):
            attr = gm.graph.get_attr(f"{holder}.{name}")
        with gm.graph.inserting_after(attr):
            call = gm.graph.call_function(checkpointed, (attr, mode, *inputs))
    call.meta["plait"] = info(nodes[-1])
    results = [call]
    if len(outputs) > 1:
        with gm.graph.inserting_after(call):
            results = [gm.graph.call_function(operator.getitem, (call, k)) for k in range(len(outputs))]
    inside = set(nodes)
    for out, new in zip(outputs, results):
        out.replace_all_uses_with(new, delete_user_cb=lambda user: user not in inside)
    for node in reversed(nodes):
        gm.graph.erase_node(node)


def _drop_unused_attrs(gm: torch.fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)


def fsdp_groups(t: Target, layers) -> tuple[tuple[int, ...], ...]:
    """The stage's layers cut as the planner cuts the model into units (a repeat of the layer
    pattern's period, e.g. attention + MLP: one transformer layer), the FSDP unit the memory
    and cost models price (planner/cost/pipeline.py)."""
    unit_of, first = {}, 0
    for k, unit in enumerate(units(t.spec)):
        unit_of.update({i: k for i in range(first, first + len(unit))})
        first += len(unit)
    groups: dict[int, list[int]] = {}
    for layer in sorted(layers):
        groups.setdefault(unit_of[layer], []).append(layer)
    return tuple(tuple(g) for g in groups.values())


def recompute(pipe: torch.fx.GraphModule, t: Target) -> torch.fx.GraphModule:
    fsdp = t.plan.layout.dp_kind == "fsdp"
    for chunk in range(len(t.plan.stages)):
        mode = stage_mode(t, chunk)
        if mode == "none" and not fsdp:
            continue
        stage = pipe.get_submodule(stage_name(chunk))
        layers = _layer_regions(stage)
        for layer, nodes in layers.items():
            extract_region(stage, nodes, f"layer{layer}", mode, layer)
        _drop_unused_attrs(stage)
        stage.graph.lint()
        stage.recompile()
        if mode != "none":
            stage.meta[RECOMPUTED] = {"mode": mode, "layers": tuple(layers)}
        if fsdp:
            stage.meta[FSDP_GROUPS] = fsdp_groups(t, layers)
    return pipe


def regions(stage: torch.fx.GraphModule) -> dict[str, torch.fx.GraphModule]:
    """A stage's recompute regions by name ({} when it recomputes nothing)."""
    holder = getattr(stage, REGIONS, None)
    return dict(holder.named_children()) if holder is not None else {}


def layer_modules(stage: torch.fx.GraphModule) -> dict[int, torch.fx.GraphModule]:
    """Layer index -> the child module that runs the layer (recompute regions and FSDP units);
    {} when the stage's layers are inline nodes."""
    out = {}
    for name in (REGIONS, UNITS):
        holder = getattr(stage, name, None)
        if holder is not None:
            out.update({int(n.removeprefix("layer")): m for n, m in holder.named_children()})
    return dict(sorted(out.items()))


def verify_recompute(pipe: torch.fx.GraphModule, t: Target) -> None:
    """Every layer of a recomputing stage is one checkpointed region; parameter names unchanged."""
    for chunk, s in enumerate(sorted(t.plan.stages, key=lambda s: s.first)):
        stage = pipe.get_submodule(stage_name(chunk))
        mode = stage_mode(t, chunk)
        want = {f"layer{i}" for i in range(s.first, s.last)} if mode != "none" else set()
        if set(regions(stage)) != want:
            raise VerifyError(f"stage {chunk} ({mode}) has regions {sorted(regions(stage))}, "
                              f"expected {sorted(want)}")
        if t.plan.layout.dp_kind == "fsdp" and set(layer_modules(stage)) != set(range(s.first, s.last)):
            raise VerifyError(f"stage {chunk}: FSDP units for layers {sorted(layer_modules(stage))}, "
                              f"expected {s.first}..{s.last - 1}")
        names = [n for n, _ in stage.named_parameters()]
        moved = [n for n in names if n.startswith((f"{REGIONS}.", f"{UNITS}."))]
        if moved:
            raise VerifyError(f"stage {chunk}: parameters renamed by recompute: {moved[:3]}")
        calls = [n for n in stage.graph.nodes if n.op == "call_function" and n.target is checkpointed]
        if len(calls) != len(want):
            raise VerifyError(f"stage {chunk}: {len(calls)} checkpointed calls for {len(want)} layers")


RECOMPUTE_PASS = Pass(
    name="recompute", run=recompute, verify=verify_recompute,
    requires=("pipeline-split",), ensures=("recompute",),
    doc="layers of recomputing stages become checkpointed regions (full or selective policy); "
        "under FSDP every layer becomes a called child module (its FSDP unit)")
