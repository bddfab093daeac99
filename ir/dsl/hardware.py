"""`device "name" { ... }` -> Device and `cluster "name" { ... }` -> Cluster (SI units throughout)."""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

from plait.ir.cluster import Cluster, Device, Link

from . import ast
from .reader import Context, Reader, describe, did_you_mean, to_float

BACKENDS = ("nccl", "gloo")
DEFAULT_LATENCY = Link.__dataclass_fields__["latency"].default


def resolve_device(ctx: Context, decl: ast.Decl) -> Device:
    r = Reader(ctx, decl.block.entries, f'device "{decl.name}"', decl.pos)
    device = Device(
        name=decl.name,
        bf16_flops=r.quantity("bf16", "compute"),
        fp8_flops=r.quantity("fp8", "compute", None),
        fp32_flops=r.quantity("fp32", "compute", None),
        memory=r.quantity("memory", "bytes"),
        hbm=r.quantity("hbm", "bandwidth"),
        calibration=_calibration(r.block("calibration")),
    )
    r.finish()
    return device


def _calibration(r: Reader | None) -> tuple[tuple[str, float], ...]:
    """Cost-model efficiencies (`calibration { matmul = 0.7 }`), kept in source order."""
    if r is None:
        return ()
    out = []
    for key, entry in r.entries.items():
        if isinstance(entry, ast.SubBlock):
            raise r.ctx.error(f"calibration values are numbers: write {key} = 0.5", entry.pos)
        out.append((key, to_float(r.ctx, entry.value, key)))
    return tuple(out)


def resolve_cluster(ctx: Context, decl: ast.Decl, find_device: Callable[[str, ast.Pos], Device]) -> Cluster:
    r = Reader(ctx, decl.block.entries, f'cluster "{decl.name}"', decl.pos)
    nodes, gpus_per_node = r.int("nodes"), r.int("gpus_per_node")
    device_ref = r.value("device", example='"h100-sxm5-80gb"')
    if not isinstance(device_ref, ast.String):
        hint = f'write device = "{device_ref.name}"' if isinstance(device_ref, ast.Ident) else None
        raise ctx.error(f"device must name a device declaration, got {describe(device_ref)}",
                        device_ref.pos, hint=hint)
    cluster = Cluster(
        name=decl.name, nodes=nodes, gpus_per_node=gpus_per_node,
        device=find_device(device_ref.value, device_ref.pos),
        intra=Link(r.quantity("intra", "bandwidth"), r.quantity("intra_latency", "time", DEFAULT_LATENCY)),
        inter=Link(r.quantity("inter", "bandwidth"), r.quantity("inter_latency", "time", DEFAULT_LATENCY)),
        backend=r.choice("backend", BACKENDS, "nccl"),
    )
    r.finish()
    return cluster


def resize_cluster(cluster: Cluster, gpus: int) -> Optional[Cluster]:
    """A job's `gpus = N`: N / gpus_per_node nodes, or one node of N when N is smaller; None when N
    is neither."""
    if gpus < cluster.gpus_per_node:
        return replace(cluster, nodes=1, gpus_per_node=gpus)
    if gpus % cluster.gpus_per_node:
        return None
    return replace(cluster, nodes=gpus // cluster.gpus_per_node)


def resize(ctx: Context, cluster: Cluster, gpus: int, pos: ast.Pos) -> Cluster:
    resized = resize_cluster(cluster, gpus)
    if resized is None:
        raise ctx.error(f"gpus ({gpus}) is not a multiple of gpus_per_node ({cluster.gpus_per_node}) "
                        f"of cluster \"{cluster.name}\"", pos,
                        hint=f"use {gpus // cluster.gpus_per_node * cluster.gpus_per_node} or "
                             f"{(gpus // cluster.gpus_per_node + 1) * cluster.gpus_per_node}")
    return resized


def unknown_name(ctx: Context, kind: str, name: str, pos: ast.Pos, known) -> Exception:
    hint = did_you_mean(name, known) or (f"known {kind}s: {', '.join(sorted(known))}" if known else
                                         f'declare it or `use` the file that declares {kind} "{name}"')
    return ctx.error(f'no {kind} named "{name}"', pos, hint=hint)
