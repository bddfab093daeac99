"""Token dispatchers: move each rank's routed tokens to the ranks holding their experts and the
expert outputs back (Megatron-Core's MoEAlltoAllTokenDispatcher / MoEAllGatherTokenDispatcher).

Experts are split over EP (rank j of the EP group holds experts [j E/ep, (j+1) E/ep)) and each
expert's FFN dimension over ETP. Every rank holds its own tokens (the attention layout's shard).

alltoall:  permute by expert -> exchange per-expert counts over EP -> uneven all-to-all over EP ->
           all-gather-v over ETP -> sort rows by local expert -> experts -> the reverse, with a
           reduce-scatter-v over ETP summing the FFN-sliced partial outputs.
allgather: all-gather tokens, routing weights and choices over ETP x EP -> every rank runs its local
           experts on the tokens routed to them -> reduce-scatter of the weighted partial outputs.

Capacity dropping happens before dispatch on the rank's own tokens (see permute.py); with padding
every split is ``capacity`` rows per expert and the count exchange is skipped. A rank may receive
zero rows for an expert, or none at all: every step is defined for empty chunks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from plait.ir import kinds

from . import comm
from .permute import Permutation, permute, unpermute


@dataclass(frozen=True)
class ExpertGrid:
    """The EP x ETP split of one MoE layer's routed experts, seen from one rank."""

    experts: int
    ep: int = 1
    etp: int = 1
    ep_rank: int = 0
    etp_rank: int = 0

    def __post_init__(self):
        problem = kinds.facet("moe", "rules").experts_over_ep(self.experts, self.ep)
        if problem:
            raise ValueError(problem)

    @property
    def local_experts(self) -> int:
        return self.experts // self.ep

    @property
    def first_expert(self) -> int:
        return self.ep_rank * self.local_experts


def sort_chunks(rows: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """rows in chunks ordered (source, expert) with ``sizes`` [S, E] -> ordered (expert, source)."""
    s, e = sizes.shape
    if s == 1 or e == 1:
        return rows
    chunks = torch.split(rows, sizes.flatten().tolist())
    return torch.cat([chunks[i * e + j] for j in range(e) for i in range(s)])


def unsort_chunks(rows: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Inverse of ``sort_chunks``: (expert, source) order back to (source, expert)."""
    s, e = sizes.shape
    if s == 1 or e == 1:
        return rows
    chunks = torch.split(rows, sizes.t().flatten().tolist())
    return torch.cat([chunks[j * s + i] for i in range(s) for j in range(e)])


@dataclass(frozen=True)
class _AllToAllState:
    perm: Permutation
    send: list[int]  # rows sent to each EP peer
    recv: list[int]  # rows received from each EP peer
    sources: torch.Tensor  # [etp * ep, E_local] rows per (source rank, local expert)


class AllToAllDispatcher:
    name = "alltoall"

    def __init__(self, grid: ExpertGrid, ep_axis: str = "ep", etp_axis: str = "etp"):
        self.grid, self.ep_axis, self.etp_axis = grid, ep_axis, etp_axis

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                 pad_to: Optional[int] = None):
        """x [T, H], routing [T, k] (sentinel = dropped) -> (rows sorted by local expert, rows per
        local expert [E_local], state for combine). ``pad_to``: rows per expert per source rank."""
        g = self.grid
        rows, perm = permute(x, indices, weights, g.experts, pad_to)
        by_peer = perm.counts.view(g.ep, g.local_experts)
        recv = by_peer
        if g.ep > 1:
            # padded splits are capacity everywhere: nothing to exchange
            recv = by_peer if pad_to is not None else comm.exchange_counts(by_peer, self.ep_axis)
            rows = comm.all_to_all_v(rows, recv.sum(1).tolist(), by_peer.sum(1).tolist(), self.ep_axis)
        sources = recv.unsqueeze(0)
        if g.etp > 1:
            sources = (recv.expand(g.etp, -1, -1) if pad_to is not None
                       else comm.all_gather_counts(recv, self.etp_axis))
            rows = comm.all_gather_v(rows, sources.sum((1, 2)).tolist(), self.etp_axis)
        sources = sources.reshape(-1, g.local_experts)
        state = _AllToAllState(perm, by_peer.sum(1).tolist(), recv.sum(1).tolist(), sources)
        return sort_chunks(rows, sources), sources.sum(0), state

    def combine(self, out: torch.Tensor, state: _AllToAllState) -> torch.Tensor:
        """Expert outputs (sorted by local expert) -> [T, H] weighted sums on the token owner."""
        g = self.grid
        out = unsort_chunks(out, state.sources)
        if g.etp > 1:
            per_etp = state.sources.view(g.etp, -1).sum(1).tolist()
            out = comm.reduce_scatter_v(out, per_etp, self.etp_axis)
        if g.ep > 1:
            out = comm.all_to_all_v(out, state.send, state.recv, self.ep_axis)
        return unpermute(out, state.perm)


class AllGatherDispatcher:
    name = "allgather"

    def __init__(self, grid: ExpertGrid, axis: str = "etp-ep"):
        self.grid, self.axis = grid, axis

    @property
    def group_size(self) -> int:
        return self.grid.ep * self.grid.etp

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                 pad_to: Optional[int] = None):
        g, n = self.grid, self.group_size
        if n > 1:
            x = comm.all_gather(x, self.axis)
            weights = comm.all_gather(weights, self.axis, op="routing_exchange")
            indices = comm.all_gather_counts(indices, self.axis).flatten(0, 1)
        local = indices - g.first_expert
        mine = (local >= 0) & (local < g.local_experts)
        local = torch.where(mine, local, torch.full_like(local, g.local_experts))
        # n source ranks, each within capacity per expert
        rows, perm = permute(x, local, weights, g.local_experts, pad_to * n if pad_to is not None else None)
        return rows, perm.counts, perm

    def combine(self, out: torch.Tensor, perm: Permutation) -> torch.Tensor:
        y = unpermute(out, perm)
        return comm.reduce_scatter(y, self.axis) if self.group_size > 1 else y


DISPATCHERS = {"alltoall": AllToAllDispatcher, "allgather": AllGatherDispatcher}


def make_dispatcher(kind: str, grid: ExpertGrid):
    if kind not in DISPATCHERS:
        raise ValueError(f"unknown token dispatcher {kind!r}; expected one of {sorted(DISPATCHERS)}")
    return DISPATCHERS[kind](grid)
