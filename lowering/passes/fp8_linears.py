"""fp8 linears: the linear GEMMs of the layers the precision policy puts in fp8 call
``plait.lowering.fp8.fp8_linear`` (per-tensor current scaling; torchao's kernel on CUDA, bound by
runtime/kernels.py) instead of nn.Linear / F.linear. The first and last ``bf16_ends`` layers, the
embedding, the LM head and everything that is not a linear layer (routers, expert grouped GEMMs,
attention cores, the SSM scan) keep their precision. Under fp32 / bf16 the graph is unchanged.
Under TP a column- / row-parallel linear also names the TP axis: its scales are the whole
tensors' (lowering/fp8.Scales).
"""
from __future__ import annotations

import torch.fx
import torch.nn.functional as F
from torch import nn

from plait.lowering import sharding
from plait.lowering.fp8 import fp8_linear
from plait.lowering.trace import info

from .base import Pass, Target, VerifyError
from .shard_tensor_parallel import AXIS as TP_AXIS

FP8_LAYERS = "plait.fp8_layers"  # gm.meta: the layers whose linears now run in fp8


def _is_linear(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) is nn.Linear
    # row-parallel linears are F.linear on a weight attribute (the router computes in fp32 and
    # lives inside the MoE layer, the tied head sits outside the layers)
    return (node.op == "call_function" and node.target is F.linear
            and all(a.op == "get_attr" for a in node.args[1:] if isinstance(a, torch.fx.Node)))


def _in_fp8_layer(node: torch.fx.Node, t: Target) -> bool:
    layer = info(node).layer
    return layer is not None and t.precision.gemm_precision(layer) == "fp8"


def _attr(gm: torch.fx.GraphModule, before: torch.fx.Node, target: str) -> torch.fx.Node:
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(target)
    node.meta = {k: v for k, v in before.meta.items() if k != "tensor_meta"}
    return node


def _padded(args: tuple) -> tuple:
    """(x, weight, bias or None)."""
    return args + (None,) * (3 - len(args))


def _tp_scales(node: torch.fx.Node, t: Target) -> tuple:
    """A TP-sharded linear's operands are shards: their fp8 scales come from the whole logical
    tensors (amax all-reduced over the TP group, as torchao's Float8 TP and Transformer Engine do),
    so the sharded program quantises exactly as one device does."""
    role = node.meta.get(sharding.ROLE)
    if t.layout.tp == 1 or role not in ("column", "row"):
        return ()
    return (TP_AXIS, t.layout.tp, role)


def fp8_linears(gm: torch.fx.GraphModule, t: Target) -> torch.fx.GraphModule:
    converted = set()
    for node in list(gm.graph.nodes):
        if not (_is_linear(gm, node) and _in_fp8_layer(node, t)):
            continue
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            weight = _attr(gm, node, f"{node.target}.weight")
            bias = _attr(gm, node, f"{node.target}.bias") if mod.bias is not None else None
            args = (node.args[0], weight, bias)
        else:
            args = tuple(node.args) + tuple(node.kwargs.values())
        args = _padded(args) + _tp_scales(node, t)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(fp8_linear, args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        converted.add(info(new).layer)
    gm.graph.lint()
    gm.recompile()
    gm.meta[FP8_LAYERS] = tuple(sorted(converted))
    return gm


def verify_fp8_linears(gm: torch.fx.GraphModule, t: Target) -> None:
    """No linear is left in an fp8 layer, and no fp8 GEMM outside one."""
    for node in gm.graph.nodes:
        if _is_linear(gm, node) and _in_fp8_layer(node, t):
            raise VerifyError(f"{node.name} in fp8 layer {info(node).layer} is still a bf16 linear")
        if node.op == "call_function" and node.target is fp8_linear and not _in_fp8_layer(node, t):
            raise VerifyError(f"{node.name} runs in fp8 outside the policy's fp8 layers")


FP8_LINEARS = Pass("fp8_linears", fp8_linears, verify_fp8_linears, requires=("grad-sync",),
                   ensures=("fp8-linears",), doc=__doc__)
