"""Helpers for the MoE multi-process tests: bind the dense and expert mesh axes of a layout, compare
on the reference's scale; ranks are spawned by tests/dist_util.py's spawn."""
from __future__ import annotations

import torch

from plait.ir.plan import Layout
from plait.runtime.mesh import Mesh, bind, build_mesh

from dist_util import GROUP_TIMEOUT_S

_MESHES: dict = {}


def bind_layout(layout: Layout) -> Mesh:
    """The runtime's mesh for ``layout`` (built once per layout: every rank creates the same groups
    in the same order), bound for lowered graphs."""
    if layout not in _MESHES:
        _MESHES[layout] = build_mesh(layout, GROUP_TIMEOUT_S)
    return bind(_MESHES[layout])


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, relative to the reference's scale when that exceeds 1 (fp32
    sums of O(50) gradients round at ~1e-5 absolute)."""
    if a.shape != b.shape:
        return float("inf")
    if not a.numel():
        return 0.0
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))
