"""Shared by the MoE benchmarks: start N gloo ranks on this machine (file:// rendezvous, one thread
each), build the runtime mesh of a layout, and build one expert-parallel MoE layer from a seeded
reference block."""
from __future__ import annotations

import os
import tempfile

import torch
import torch.multiprocessing as mp

from plait.ir.job import MoEOptions
from plait.ir.model import MoE
from plait.ir.plan import Layout
from plait.lowering.modules.moe import MoEBlock
from plait.lowering.moe import ExpertGrid, ExpertParallelMoE
from plait.runtime.mesh import Mesh, bind, build_mesh, destroy, init_distributed

TIMEOUT_S = 300
_MESHES: dict[Layout, Mesh] = {}


def mesh_for(layout: Layout) -> Mesh:
    """The runtime mesh of ``layout`` (built once per process and layout), bound for collectives."""
    if layout not in _MESHES:
        _MESHES[layout] = build_mesh(layout, TIMEOUT_S)
    return bind(_MESHES[layout])


def expert_layer(spec: MoE, hidden: int, layout: Layout, options: MoEOptions, rank: int,
                 seed: int = 0) -> ExpertParallelMoE:
    """This rank's shard of a seeded reference MoE block (same weights on every rank)."""
    mesh = mesh_for(layout)
    torch.manual_seed(seed)
    ref = MoEBlock(spec, hidden, options)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    grid = ExpertGrid(spec.experts, layout.ep, layout.etp, mesh.coord("ep"), mesh.coord("etp"))
    return ExpertParallelMoE.from_reference(ref, grid, options)


def _worker(rank: int, world: int, tmp: str, fn, args) -> None:
    torch.set_num_threads(1)
    init_distributed("gloo", TIMEOUT_S, f"file://{tmp}/rendezvous", rank, world)
    try:
        torch.save(fn(rank, world, *args), os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        destroy()


def run_ranks(fn, world: int, *args) -> list:
    """``fn(rank, world, *args)`` on ``world`` ranks; each rank's return value, in rank order."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, tmp, fn, args), nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]
