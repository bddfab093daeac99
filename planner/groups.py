"""Rank -> process-group mapping, exactly as Megatron-Core's ``RankGenerator`` builds it.

A rank's coordinates come from the layout's order string (default "tp-cp-ep-dp-pp"), the first
name varying fastest. Two generators share the world:

  dense  (attention, mlp, mamba):  sizes tp, cp, dp, pp   (ep = 1)
  expert (moe):                    sizes etp, ep, edp, pp (cp = 1; etp takes tp's slot, edp dp's)

so PP groups come out identical on both sides. A group over a subset of dimensions (a "mask") holds
the ranks that differ only in those dimensions, enumerated with the masked dimensions' own
first-fastest order; groups are listed in the first-fastest order of the remaining dimensions.
Pure Python: the runtime turns these lists into torch.distributed groups, the cost model uses them
to see which collectives cross node boundaries.
"""
from __future__ import annotations

from functools import lru_cache
from math import prod

from plait.ir.errors import LayoutError
from plait.ir.plan import DIMS, Layout, parse_order  # noqa: F401  (re-exported: rank order)

# Group names printed per side -> the dimensions (in Megatron's vocabulary) each one spans.
DENSE_GROUPS: dict[str, tuple[str, ...]] = {
    "tp": ("tp",), "cp": ("cp",), "dp": ("dp",), "dp-cp": ("dp", "cp"), "pp": ("pp",),
    "tp-pp": ("tp", "pp"),
}
EXPERT_GROUPS: dict[str, tuple[str, ...]] = {
    "ep": ("ep",), "etp": ("tp",), "etp-ep": ("tp", "ep"), "edp": ("dp",), "pp": ("pp",),
}


def _decompose(index: int, shape: tuple[int, ...]) -> list[int]:
    """Mixed-radix digits of ``index``, first digit varying fastest."""
    digits = []
    for size in shape:
        digits.append(index % size)
        index //= size
    return digits


def _strides(shape: tuple[int, ...]) -> list[int]:
    out, acc = [], 1
    for size in shape:
        out.append(acc)
        acc *= size
    return out


@lru_cache(maxsize=4096)
def masked_groups(sizes: tuple[int, ...], mask: tuple[bool, ...]) -> tuple[tuple[int, ...], ...]:
    """Megatron's ``generate_masked_orthogonal_rank_groups``: one group per assignment of the
    unmasked coordinates, ranks inside a group enumerated over the masked coordinates."""
    strides = _strides(sizes)
    inner = tuple(s for s, m in zip(sizes, mask) if m)
    inner_strides = [d for d, m in zip(strides, mask) if m]
    outer = tuple(s for s, m in zip(sizes, mask) if not m)
    outer_strides = [d for d, m in zip(strides, mask) if not m]
    groups = []
    for g in range(prod(outer)):
        base = sum(i * d for i, d in zip(_decompose(g, outer), outer_strides))
        groups.append(tuple(base + sum(i * d for i, d in zip(_decompose(r, inner), inner_strides))
                            for r in range(prod(inner))))
    return tuple(groups)


def side_sizes(layout: Layout, side: str) -> dict[str, int]:
    if side == "dense":
        return {"tp": layout.tp, "cp": layout.cp, "ep": 1, "dp": layout.dp, "pp": layout.pp}
    return {"tp": layout.etp, "cp": 1, "ep": layout.ep, "dp": layout.edp, "pp": layout.pp}


def groups_over(layout: Layout, side: str, dims: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """Groups of one side spanning ``dims`` (Megatron names: tp cp ep dp pp)."""
    names = parse_order(layout.order)
    size_of = side_sizes(layout, side)
    sizes = tuple(size_of[n] for n in names)
    return masked_groups(sizes, tuple(n in dims for n in names))


def check_worlds(layout: Layout) -> None:
    if layout.world != layout.expert_world:
        raise LayoutError(
            f"dense world tp*cp*dp*pp = {layout.tp}*{layout.cp}*{layout.dp}*{layout.pp} = "
            f"{layout.world} differs from expert world etp*ep*edp*pp = {layout.etp}*{layout.ep}*"
            f"{layout.edp}*{layout.pp} = {layout.expert_world}",
            hint="both sides of a folded layout must cover the same ranks")


def rank_groups(layout: Layout) -> dict:
    """{"dense": {name: [[ranks]]}, "expert": {name: [[ranks]]}} for every group the runtime and
    the cost model need (see DENSE_GROUPS / EXPERT_GROUPS)."""
    check_worlds(layout)
    return {
        "dense": {name: [list(g) for g in groups_over(layout, "dense", dims)]
                  for name, dims in DENSE_GROUPS.items()},
        "expert": {name: [list(g) for g in groups_over(layout, "expert", dims)]
                   for name, dims in EXPERT_GROUPS.items()},
    }


def group_of(layout: Layout, side: str, name: str, rank: int) -> tuple[int, ...]:
    """The group named ``name`` (a key of DENSE_GROUPS / EXPERT_GROUPS) that holds ``rank``."""
    table = DENSE_GROUPS if side == "dense" else EXPERT_GROUPS
    for g in groups_over(layout, side, table[name]):
        if rank in g:
            return g
    raise LayoutError(f"rank {rank} is outside the world of {layout.world} ranks")
