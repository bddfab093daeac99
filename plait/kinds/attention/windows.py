"""Sliding-window geometry for attention's counts facet: how many keys a query attends to, and which
ring steps of context parallelism's zigzag layout a window leaves anything to compute in. Reachable
as ``plait.ir.counts.<name>`` (the counts facet exports them); the lowering's ring attention takes
the steps ``ring_steps`` gives, so the cost model counts the exchanges that really happen.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

from plait.ir.model import ModelSpec


def attended_keys(seq_len: int, window: Optional[int] = None, causal: bool = True) -> float:
    """Keys a query attends to on average: the area of the visible part of the s x s score square
    over s. Causal: s / 2 (Megatron's convention), a band of width w = min(window, s):
    w - w^2 / (2s). ``causal=False`` counts the whole rectangle, s or w per query."""
    w = seq_len if window is None else min(window, seq_len)
    return w - w * w / (2 * seq_len) if causal else float(w)


@lru_cache(maxsize=256)  # the planner's attention cost asks per layout; a model's windows are fixed
def attention_windows(model: ModelSpec) -> tuple[Optional[int], ...]:
    """The window of each attention layer in model order (None: full causal attention)."""
    attn = model.block("attention")
    return tuple(attn.window_of(i) for i in range(model.count("attention")))


@lru_cache(maxsize=1024)  # the planner's CP cost asks per plan; the geometry is O(cp^2)
def ring_steps(cp: int, seq_len: int, window: Optional[int] = None) -> tuple[int, ...]:
    """Ring distances t (0 = a rank's own block) whose K/V block some rank's queries see, under
    context parallelism's zigzag layout (2*cp chunks of c = s / (2 cp) tokens, rank r holding
    chunks r and 2 cp - 1 - r): a query chunk a sees key chunk b < a when the nearest pair is
    within the window, (a - b) c - (c - 1) < w. Every t without a window; with one, the steps a
    ring attention takes (and the exchanges it sends): blocks wholly outside the window are
    skipped. The same for every rank, so all ranks take the same steps."""
    if window is None:
        return tuple(range(cp))
    chunk = seq_len // (2 * cp)
    def sees(a: int, b: int) -> bool:
        return a == b or (a > b and (a - b) * chunk - (chunk - 1) < window)
    held = [(r, 2 * cp - 1 - r) for r in range(cp)]
    return tuple(t for t in range(cp)
                 if any(sees(a, b) for r in range(cp) for a in held[r] for b in held[(r - t) % cp]))


@lru_cache(maxsize=1024)  # the planner's CP cost asks per layout; a sum over the model's layers
def ring_exchanges(model: ModelSpec, cp: int, seq_len: int) -> float:
    """K/V block exchanges per attention layer of ring context parallelism, the mean over the
    model's attention layers: cp - 1 for full attention, fewer with a short window."""
    windows = attention_windows(model) or (model.block("attention").window,)
    return sum(len(ring_steps(cp, seq_len, w)) - 1 for w in windows) / len(windows)
