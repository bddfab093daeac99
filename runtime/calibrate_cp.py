"""The host work context parallelism adds to a block, measured by `plait calibrate` (issue #17).

Under CP a rank holds two zigzag chunks of every sequence, and each whole-sequence op of a block
is replaced (lowering/passes/context_parallel.py, the kinds' ``sequence_ops``): causal attention
by the ring (cp_attention.py: per ring step a pair kernel for each of the rank's chunk pairs, an
lse merge, K / V exchanged with the neighbours), the Mamba conv and SSD scan by their
state-passing forms (mamba_cp.py: each chunk scanned on its own, its final state and decay, three
all-gathers, the entering states and the correction term). On the 2-core VM tiny-hybrid-local
under cp2 dispatches 4.5x the ATen calls of dp2 for the same tokens per rank (133 k against 30 k
per step, benchmarks/cp_overhead.py); where a block is host-bound its time follows the calls, not
the FLOPs.

The probe runs, on every pair of the node's ranks at once, interleaved, forward + backward of

    P  each kind's reference sequence ops on TOKENS tokens
    C  their CP replacements (the lowering's own, cp = 2) on TOKENS local tokens of a 2*TOKENS
       sequence, with the seconds spent inside plait's collectives counted
       (lowering/collectives.py seconds_inside: the exchanges the cost model prices itself)

    cp_host_us_KIND = (C - inside) - P      per block and micro-batch, at cp = 2

On a small block the compute of either is a few microseconds: what is left is host work.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from plait.ir import kinds
from plait.lowering.cp_ops import zigzag_shard

from . import kernels
from .calibrate_timing import group_mean, synchronize

AXIS = "calibrate-cp"
CP = 2            # the CP size probed (one pair of ranks per group)
TOKENS = 32       # local tokens per rank: two zigzag chunks of 16
CHUNK = 16        # the SSD scan's chunk: one scan chunk per zigzag chunk, as tiny-hybrid cp2
CALLS = 8         # forward + backward passes per timed run
REPEAT = 5        # timed runs of each variant (interleaved); the median is kept


def sequence_ops(kind: str, device="cpu") -> dict:
    """{reference op name: (reference op, its ring CP replacement)} of a kind's sequence ops that
    exchange chunks: exactly what the lowering swaps in, each as the program runs it on ``device``
    (runtime/kernels.py bound: a fused kernel where one is bound for it)."""
    return {s.op.__name__: (kernels.bound(s.op, device)[0],
                            kernels.bound(s.replacement["ring"], device)[0])
            for s in kinds.facet(kind, "parallelize").sequence_ops() if s.communicates}


def _leaf(t: torch.Tensor, dtype, device) -> torch.Tensor:
    return t.to(dtype=dtype, device=device).requires_grad_(True)


def attention_inputs(tokens: int, dtype, device) -> list[tuple[str, tuple]]:
    """(op name, args) of one attention block's sequence ops: grouped-query causal
    attention, 4 query heads over 2 KV heads of 16."""
    q, k, v = (_leaf(torch.randn(1, tokens, h, 16), dtype, device) for h in (4, 2, 2))
    return [("causal_attention", (q, k, v, 0.25))]


def mamba_inputs(tokens: int, dtype, device) -> list[tuple[str, tuple]]:
    """One Mamba2 block's: the depthwise causal conv over x | B | C, the chunked SSD scan (4 heads
    of 8, one group, state 8)."""
    heads, head_dim, state, conv = 4, 8, 8, 4
    channels = heads * head_dim + 2 * state
    x, weight, bias, xs, b, c = (_leaf(torch.randn(*shape), dtype, device) for shape in (
        (1, tokens, channels), (channels, 1, conv), (channels,), (1, tokens, heads, head_dim),
        (1, tokens, 1, state), (1, tokens, 1, state)))
    dt = _leaf(torch.nn.functional.softplus(torch.randn(1, tokens, heads)), dtype, device)
    a = _leaf(-torch.rand(heads) - 0.5, dtype, device)
    return [("causal_conv1d", (x, weight, bias)), ("ssd_scan", (xs, dt, a, b, c, CHUNK))]


INPUTS = {"attention": attention_inputs, "mamba": mamba_inputs}


def local_call(replacement, args: tuple, rank: int) -> tuple:
    """(fn, args) of a CP replacement on this rank's zigzag chunks of ``args`` (tensors whose dim
    1 is the 2 * TOKENS sequence; weights, A and the chunk length as they are), as the lowering
    calls it: ``(*args, axis, cp, rank)``."""
    def local(arg):
        if isinstance(arg, torch.Tensor) and arg.dim() > 1 and arg.shape[1] == CP * TOKENS:
            return zigzag_shard(arg.detach(), CP, rank).requires_grad_(True)
        return arg
    return replacement, tuple(local(a) for a in args) + (AXIS, CP, rank)


def _pass(calls: list) -> None:
    """Forward + backward of each (fn, args) in turn."""
    for fn, args in calls:
        out = fn(*args)
        out.float().sum().backward()


def kind_calls(kind: str, rank: int, dtype, device) -> tuple[list, list]:
    """(reference calls on TOKENS tokens, CP calls on this rank's TOKENS of a 2 * TOKENS
    sequence), each a list of (fn, args)."""
    ops = sequence_ops(kind, device)
    plain = [(ops[name][0], args) for name, args in INPUTS[kind](TOKENS, dtype, device)]
    cp = [local_call(ops[name][1], args, rank)
          for name, args in INPUTS[kind](CP * TOKENS, dtype, device)]
    return plain, cp


def _timed(calls: list, device, n: int) -> tuple[float, float]:
    """(seconds of ``n`` passes, seconds of them inside plait's collectives)."""
    from plait.lowering.collectives import seconds_inside

    synchronize(device)
    start = time.perf_counter()
    with seconds_inside() as inside:
        for _ in range(n):
            _pass(calls)
        synchronize(device)
    return time.perf_counter() - start, inside[0]


def measure_cp(rank: int, on_host: int, dtype, device, calls: int = CALLS,
               repeat: int = REPEAT) -> dict | None:
    """{kind: {plain_s, cp_s, inside_s, host_s}} per block pass, each the mean over the pairs'
    ranks, for consecutive pairs of the first ``on_host`` ranks (one node); every rank of the
    world must call this (each creates every group); None on a rank outside the pairs."""
    from plait.lowering.collectives import bind_axis, unbind_all

    pairs = [list(range(s, s + CP)) for s in range(0, on_host - CP + 1, CP)]
    mine = None
    for ranks in pairs:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = (group, ranks)
    out: dict = {}
    if mine:
        bind_axis(AXIS, mine[0], tuple(mine[1]))
    me = mine[1].index(rank) if mine else 0
    for kind in INPUTS:
        plain, cp = kind_calls(kind, me, dtype, device)
        runs: list[list[float]] = [[], [], []]
        if mine:
            _pass(plain), _pass(cp)  # warm the dispatch and gloo's pairs
        dist.barrier()
        for _ in range(repeat):  # interleaved so that a load swing hits both alike
            runs[0].append(_timed(plain, device, calls)[0] if mine else 0.0)
            total, inside = _timed(cp, device, calls) if mine else (0.0, 0.0)
            runs[1].append(total)
            runs[2].append(inside)
        member = mine is not None
        plain_s, cp_s, inside_s = (group_mean(statistics.median(r) / calls, member) for r in runs)
        out[kind] = {"plain_s": plain_s, "cp_s": cp_s, "inside_s": inside_s,
                     "host_s": max(0.0, cp_s - inside_s - plain_s)}
    if mine:
        unbind_all()
    return out if mine else None


def cp_values(measured: dict) -> tuple[dict, dict]:
    """({cp_host_us_KIND}, {key: how measured}) from measure_cp's dict."""
    values, sources = {}, {}
    for kind, m in measured.items():
        values[f"cp_host_us_{kind}"] = m["host_s"] * 1e6
        sources[f"cp_host_us_{kind}"] = (
            f"{kind}'s sequence ops forward + backward, reference on {TOKENS} tokens "
            f"{m['plain_s'] * 1e3:.2f} ms, ring CP replacements on {TOKENS} of {CP * TOKENS} "
            f"{m['cp_s'] * 1e3:.2f} ms of which {m['inside_s'] * 1e3:.2f} ms inside collectives, "
            f"every pair of ranks at once (runtime/calibrate_cp.py) -> {m['host_s'] * 1e6:.0f} us "
            f"per block and micro-batch at cp = {CP}")
    return values, sources
