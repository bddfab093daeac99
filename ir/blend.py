"""Blended, phased sampling: which source each global sample comes from, exactly and in O(batch).

Within a phase with weights w_k, source k's j-th sample "arrives" at time (j + 1/2) / w_k, and the
phase's samples are the arrivals in order of (time, source index). This is the Sainte-Lague /
Webster sequence of apportionment: after n samples source k has round(w_k * T) of them for the
time T the n-th arrival happened, so its count stays within about one sample of w_k * n at every
prefix (tests/ir/test_blend.py measures the bound), like Megatron's BlendedDataset
(which picks the source with the largest deficit w_k * (n + 1) - count_k, sequentially, in C++).
Unlike the greedy rule, the n-th sample is found without replaying the n - 1 before it: a step's
batch, or a resume at any step, costs O(global batch + sources).

A source's draws continue across phases (phase 2 takes the samples after those phase 1 took), and
its j-th draw is window perm_e[j mod W] of epoch e = j // W, with a seeded permutation per source
and epoch. Nothing depends on the data-parallel size or the layout: ranks slice the global order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Phase:
    start: int  # first global sample of the phase
    weights: tuple[float, ...]  # one per source (zero: not drawn in this phase), summing to 1


def _times(w: float, j: np.ndarray) -> np.ndarray:
    return (j + 0.5) / w


def _count_before(w: float, t: float) -> int:
    """#{j >= 0 : (j + 1/2) / w < t}, computed with the same float expression as the arrival
    times themselves so that counts and sorted arrivals always agree."""
    if w <= 0 or t <= 0:
        return 0
    j = max(0, int(np.ceil(w * t - 0.5)) - 1)
    while j > 0 and _times(w, np.float64(j - 1)) >= t:
        j -= 1
    while _times(w, np.float64(j)) < t:
        j += 1
    return j


def arrivals(weights: Sequence[float], first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, draw index within the phase) of the phase's samples first .. first + count - 1."""
    k_all = len(weights)
    t0 = max(0.0, float(first - k_all - 1))  # at most `first` arrivals happen before t0
    t1 = float(first + count + k_all + 1)  # at least first + count arrivals happen before t1
    srcs, draws, times = [], [], []
    before = 0
    for k, w in enumerate(weights):
        lo, hi = _count_before(w, t0), _count_before(w, t1)
        before += lo
        j = np.arange(lo, hi, dtype=np.int64)
        srcs.append(np.full(len(j), k, dtype=np.int64))
        draws.append(j)
        times.append(_times(w, j.astype(np.float64)))
    src, draw, t = (np.concatenate(a) for a in (srcs, draws, times))
    order = np.lexsort((src, t))  # by time, ties by source index
    pick = order[first - before:first - before + count]
    return src[pick], draw[pick]


def counts(weights: Sequence[float], n: int) -> np.ndarray:
    """Samples each source contributes among a phase's first n samples."""
    out = np.zeros(len(weights), dtype=np.int64)
    if n <= 0:
        return out
    t = float(max(0, n - len(weights) - 1))
    for k, w in enumerate(weights):
        out[k] = _count_before(w, t)
    src, _ = arrivals(weights, int(out.sum()), n - int(out.sum()))
    np.add.at(out, src, 1)
    return out


class BlendSchedule:
    """The global sample order of a phased blend: sample n -> (source, draw of that source)."""

    def __init__(self, phases: Sequence[Phase], num_sources: int):
        self.phases = sorted(phases, key=lambda p: p.start)
        if not self.phases or self.phases[0].start != 0:
            raise ValueError("the first phase starts at sample 0")
        self.num_sources = num_sources
        # draws of each source before each phase (sources continue across phases)
        self.offsets = [np.zeros(num_sources, dtype=np.int64)]
        for p, nxt in zip(self.phases, self.phases[1:]):
            self.offsets.append(self.offsets[-1] + counts(p.weights, nxt.start - p.start))

    def draws_until(self, n: int) -> np.ndarray:
        """Draws of each source among global samples 0 .. n - 1 (epoch caps check this)."""
        i = self._phase_of(n - 1) if n > 0 else 0
        p = self.phases[i]
        return self.offsets[i] + counts(p.weights, max(0, n - p.start))

    def _phase_of(self, n: int) -> int:
        starts = [p.start for p in self.phases]
        return int(np.searchsorted(starts, n, side="right")) - 1

    def samples(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, draw index of that source) for global samples first .. first + count - 1,
        split at phase boundaries."""
        srcs, draws = [], []
        n, end = first, first + count
        while n < end:
            i = self._phase_of(n)
            p = self.phases[i]
            stop = min(end, self.phases[i + 1].start) if i + 1 < len(self.phases) else end
            s, d = arrivals(p.weights, n - p.start, stop - n)
            srcs.append(s)
            draws.append(d + self.offsets[i][s])
            n = stop
        return np.concatenate(srcs), np.concatenate(draws)


# ---- a permutation of [0, n) without an array of n entries ---------------------------------------

_ROUNDS = 6  # rounds of the Feistel network (4 make a strong pseudo-random permutation; 2 spare)
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fixed bijective scramble of 64-bit words (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


SMALL = 64
_C1, _C2, _M = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, (1 << 64) - 1


def _mix_int(x: int) -> int:
    """_mix on one Python int (the same bits)."""
    x = ((x ^ (x >> 30)) * _C1) & _M
    x = ((x ^ (x >> 27)) * _C2) & _M
    return x ^ (x >> 31)


def _permute_one(x: int, n: int, half: int, ks: list[int]) -> int:
    low = (1 << half) - 1
    while True:
        left, right = x >> half, x & low
        for k in ks:
            left, right = right, left ^ (_mix_int(right ^ k) & low)
        x = (left << half) | right
        if x < n:
            return x


def round_keys(*key: int) -> np.ndarray:
    """Keys of the shuffle of one source in one epoch: (seed, source, epoch) -> one word per round."""
    return np.random.SeedSequence(list(key)).generate_state(_ROUNDS, dtype=np.uint64)


def permute(index: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """Positions 0..n-1 -> a keyed pseudo-random permutation of 0..n-1, one index at a time: a
    balanced Feistel network over the smallest even number of bits holding n, walked again while
    it lands past n (a bijection on the larger range stays one on [0, n)). A source of 10^9
    windows needs no 8 GB shuffle array on every rank, and any draw is found directly."""
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    if len(index) <= SMALL:  # a step's draws of one source: Python ints beat numpy's call overhead
        ks = [int(k) for k in keys]
        return np.fromiter((_permute_one(int(i), n, half, ks) for i in index), np.int64, len(index))
    low = np.uint64((1 << half) - 1)
    x = np.asarray(index, dtype=np.uint64).copy()
    todo = np.ones(len(x), dtype=bool)
    with np.errstate(over="ignore"):
        while todo.any():
            v = x[todo]
            left, right = v >> np.uint64(half), v & low
            for k in keys:
                left, right = right, left ^ (_mix(right ^ k) & low)
            x[todo] = (left << np.uint64(half)) | right
            todo = x >= np.uint64(n)
    return x.astype(np.int64)
