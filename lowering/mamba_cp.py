"""Mamba2 under context parallelism, on the zigzag layout (see cp_ops.py), by passing state.

A rank holds two sequence chunks of every Mamba layer's input. Two things cross chunk borders:

  * the depthwise causal conv reads the conv-1 tokens before each chunk: every rank all-gathers
    the conv-1 last tokens of its two chunks (a *halo*) and prepends its predecessors' tails;
  * the scan state. The SSD recurrence is linear in its state, so each chunk is scanned from a zero
    state, which gives its outputs up to one missing term, its own final state S_c and its total
    log-decay L_c. One all-gather of (S_c, L_c) over the CP group lets every rank form the state
    entering each of its chunks, E_{c+1} = exp(L_c) E_c + S_c (2*cp tiny steps, done redundantly
    on every rank instead of a sequential hand-off), and add the missing term
    y_t += exp(a_1 + ... + a_t) * C_t . E_c, with a_t = dt_t * A.

Why state passing and not Megatron-Core's all-to-all between sequence and head sharding: the
all-to-all moves every token's x, B, C, dt and y (about 2 * (2*d_inner + 2*G*N + H) values per
token, forward), growing with the sequence; the state exchange moves 2*cp states of H*P*N values
and the halos, independent of the sequence length, and needs no head or group divisibility by cp
(tiny-hybrid under TP2 x CP2 has one group per TP rank). benchmarks/ring_attention.py measures
both volumes for real models. Autograd flows through the `plait::gather_seq` all-gather
(reduce-scatter backward), so gradients of halos and states return to their owners.
"""
from __future__ import annotations

import torch

from .cp_ops import zigzag_chunks, zigzag_order
from .modules import ssd
from .modules.mamba import causal_conv1d
from .modules.norms import upcast


def _gather_chunks(local: torch.Tensor, axis: str, size: int) -> torch.Tensor:
    """[2, ...] per rank -> [2*size, ...] indexed by global chunk id."""
    gathered = torch.ops.plait.gather_seq(local, axis, size, 0)
    order = zigzag_order(size)
    return gathered[[order.index(c) for c in range(2 * size)]]


def cp_causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias, axis: str, size: int,
                     rank: int) -> torch.Tensor:
    """causal_conv1d on this rank's two chunks [b, 2L, c], with the halos of their predecessors."""
    halo = weight.shape[-1] - 1
    chunks = x.chunk(2, dim=1)
    if halo == 0:
        return causal_conv1d(x, weight, bias)
    tails = torch.stack([c[:, -halo:] for c in chunks])  # [2, b, halo, c]
    every = _gather_chunks(tails, axis, size)  # [2*size, b, halo, c] by chunk id
    out = []
    for chunk, cid in zip(chunks, zigzag_chunks(size, rank)):
        before = every[cid - 1] if cid > 0 else torch.zeros_like(tails[0])
        out.append(causal_conv1d(torch.cat((before, chunk), dim=1), weight, bias)[:, halo:])
    return torch.cat(out, dim=1)


def chunk_final_state(x, dt, A, B) -> tuple[torch.Tensor, torch.Tensor]:
    """(final state [b, h, p, n], total log-decay [b, h]) of a zero-state scan over one chunk:
    S = sum_t exp(a_{t+1} + ... + a_T) dt_t x_t B_t^T."""
    h = x.shape[2]
    a_cum = (upcast(dt) * A).cumsum(1)  # [b, s, h]
    total = a_cum[:, -1]
    weight = torch.exp(total[:, None] - a_cum) * upcast(dt)
    B = ssd.heads_from_groups(upcast(B), h)
    return torch.einsum("bsh,bshp,bshn->bhpn", weight, upcast(x), B), total


def entering_states(states: torch.Tensor, decays: torch.Tensor) -> list[torch.Tensor]:
    """E_0 = 0, E_{c+1} = exp(L_c) E_c + S_c over the global chunks."""
    entering = [torch.zeros_like(states[0])]
    for c in range(states.shape[0] - 1):
        entering.append(entering[-1] * torch.exp(decays[c])[..., None, None] + states[c])
    return entering


def cp_ssd_scan(x, dt, A, B, C, chunk: int, axis: str, size: int, rank: int) -> torch.Tensor:
    """ssd_scan on this rank's two zigzag chunks (x [b, 2L, h, p] ...), exact for the whole
    sequence: zero-state chunk scans corrected by the states entering each chunk."""
    parts = [t.chunk(2, dim=1) for t in (x, dt, B, C)]
    finals = [chunk_final_state(parts[0][i], parts[1][i], A, parts[2][i]) for i in range(2)]
    states = _gather_chunks(torch.stack([f[0] for f in finals]), axis, size)
    decays = _gather_chunks(torch.stack([f[1] for f in finals]), axis, size)
    entering = entering_states(states, decays)
    out = []
    for i, cid in enumerate(zigzag_chunks(size, rank)):
        xi, dti, Bi, Ci = (p[i] for p in parts)
        y = ssd.ssd_chunked_recomputed(xi, dti, A, Bi, Ci, chunk)
        decay_in = torch.exp((upcast(dti) * A).cumsum(1))  # [b, s, h]
        Ch = ssd.heads_from_groups(upcast(Ci), x.shape[2])
        y = y + torch.einsum("bshn,bhpn->bshp", Ch, entering[cid]) * decay_in[..., None]
        out.append(y)
    return torch.cat(out, dim=1)
