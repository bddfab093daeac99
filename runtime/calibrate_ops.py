"""`plait calibrate`'s compute probes that run the runtime's own op sequences, in the conditions
training runs them (runtime/calibrate_cost.py calls them; the cost model reads what they give):

  linear     one linear layer's forward and backward through autograd, as every projection of a
             lowered block runs: the forward GEMM, the data-gradient GEMM and the weight-gradient
             GEMM (its operands transposed, the contraction over the tokens), with the caches
             evicted before each run. Between two uses of a weight training runs the other
             layers' norms, attention and GEMMs, whose tensors push that weight out of a core's
             private caches; back-to-back GEMMs on the same operands (the old probe) keep them hot
             and overstate the rate. The same sequence on a 4 x 4 x 4 linear (all dispatch,
             autograd and launch overhead, no arithmetic) is subtracted: that overhead is priced
             per block by host_us_KIND, so counting it here too would charge it twice.
  elementwise  plait's memory-bound modules (RMSNorm, the MLP's activation times its up
             projection, a residual add) forward and backward, their bytes counted as the cost
             model counts them (ir/counts/traffic.py, planner/cost/compute.py
             BWD_MEMORY): the rate the runtime's unfused kernels reach. On the CPU these run as
             several eager ATen ops each (pow, mean, rsqrt, mul, silu), every one a pass over
             the tensor, so they reach far less than a large copy's bandwidth.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from plait.lowering.modules.mlp import activation_fn
from plait.lowering.modules.norms import RMSNorm
from plait.ir import counts
from plait.planner.cost.compute import BWD_MEMORY

from .calibrate_timing import representative, sum_over_world, synchronize

# Written before every timed run: more than a core's private caches hold (1-2 MiB of L2 on
# current x86 server cores, 50 MiB of L2 on an H100 only partly), the eviction the kernels
# between a layer's GEMMs cause
EVICT_BYTES = 8 << 20
TINY = (4, 4, 4)  # a linear with no arithmetic to speak of: its time is all overhead


def timed_cold(fn: Callable[[], object], device: torch.device, repeat: int = 7,
               warmup: int = 2) -> float:
    """The representative (calibrate_timing.representative) of ``repeat`` runs of ``fn``, the
    caches evicted before each (not timed)."""
    evict = torch.empty(EVICT_BYTES // 4, device=device)
    out = []
    for i in range(warmup + repeat):
        evict.fill_(float(i))
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        if i >= warmup:
            out.append(time.perf_counter() - start)
    return representative(out)


def linear_seconds(m: int, n: int, k: int, dtype, device, repeat: int = 7) -> float:
    """Seconds of one [m x k] -> [m x n] linear's forward and backward (input and weight both
    take gradients, as inside a block), caches evicted first."""
    x = torch.randn(m, k, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(n, k, dtype=dtype, device=device, requires_grad=True)
    grad = torch.randn(m, n, dtype=dtype, device=device)

    def run():
        F.linear(x, w).backward(grad)
        x.grad = w.grad = None  # as zero_grad leaves them: the next backward allocates

    return timed_cold(run, device, repeat)


def linear_rates(shapes, dtype, device) -> list[tuple[int, int, int, float]]:
    """[(m, n, k, FLOP/s)] of the forward + backward GEMMs (6 m n k FLOPs), the overhead of the
    same sequence on a TINY linear taken off first."""
    overhead = linear_seconds(*TINY, dtype, device, repeat=20)
    return [(m, n, k, 6.0 * m * n * k / gemm_seconds(linear_seconds(m, n, k, dtype, device),
                                                      overhead)) for m, n, k in shapes]


def gemm_seconds(seconds: float, overhead: float) -> float:
    """The GEMMs' share of a linear's ``seconds``: less the ``overhead``, but never less than half
    (the grid keeps every shape's arithmetic several times the overhead: a shape measured within
    twice it was disturbed, and the difference of two noisy times would be noise)."""
    return max(seconds - overhead, 0.5 * seconds)


def elementwise_rate(tokens: int, hidden: int, dtype, device) -> float:
    """Bytes/s of plait's memory-bound modules forward and backward: RMSNorm of the residual
    stream, a residual add, the SwiGLU activation of an FFN of width ``hidden`` (bytes as the
    cost model counts them, the backward BWD_MEMORY times the forward)."""
    norm = RMSNorm(hidden).to(device=device, dtype=dtype)
    act = activation_fn("swiglu")

    def leaf(cols):
        return torch.randn(tokens, cols, dtype=dtype, device=device, requires_grad=True)

    x, residual, gate, up = leaf(hidden), leaf(hidden), leaf(hidden), leaf(hidden)

    def run():
        out = norm(x) + residual
        h = act(gate) * up
        (out.sum() + h.sum()).backward()
        for t in (x, residual, gate, up):
            t.grad = None

    item = torch.finfo(dtype).bits // 8
    norm_b, residual_b = counts.norm_residual_traffic(tokens, hidden, item)
    forward = norm_b + residual_b + counts.activation_fn_traffic(tokens, 2 * hidden, hidden, item)
    return (1 + BWD_MEMORY) * forward / timed_cold(run, device)


def share_probe_model():
    """An attention + MLP decoder pair at the tiny jobs' width, built by plait's own lowering:
    the mix of GEMMs, memory-bound kernels, autograd and Python a training step runs."""
    from plait.ir.model import MLP, Attention, ModelSpec, Rope
    from plait.lowering.build import build_model

    spec = ModelSpec(name="share-probe", vocab=64, hidden=128, layers=("attention", "mlp"),
                     max_seq=256, attention=Attention(heads=4, kv_heads=2, head_dim=32,
                                                      rope=Rope(theta=1e4)),
                     mlp=MLP(ffn=352))
    return build_model(spec)


def sustained_block_rate(dtype, device, tokens: int = 256, count: int = 30) -> float:
    """Forward + backward passes per second of share_probe_model's blocks on ``tokens`` tokens,
    ``count`` back to back and timed as one: ranks that start together after a barrier run side
    by side for the whole measurement. How many ranks a host runs at full rate is asked of the
    workload training runs, not of one hot GEMM, whose operands stay in a core's cache (on this
    project's 2-core VM, 2026-12-03: 4 ranks at once reached 1.80x one rank's block passes and
    2.12x its GEMM rate; 2 ranks 1.95x both)."""
    layers = share_probe_model().to(device=device, dtype=dtype).layers
    x = torch.randn(1, tokens, 128, dtype=dtype, device=device, requires_grad=True)

    def step():
        y = x
        for layer in layers:
            y = layer(y)
        y.sum().backward()

    step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(count):
        step()
    synchronize(device)
    return count / (time.perf_counter() - start)


SHARING_ROUNDS = 3


def measure_sharing(rank: int, on_host: int, dtype, device,
                    rounds: int = SHARING_ROUNDS) -> list[tuple[float, float]]:
    """[(rank 0 alone's block passes per second, the first ``on_host`` ranks' sum running them at
    once)] per round (sustained_block_rate), the two in turns so that the machine's drifting
    speed hits both alike; every rank calls it, rank 0's list is the one meant."""
    import torch.distributed as dist

    out = []
    for _ in range(rounds):
        dist.barrier()
        alone = sustained_block_rate(dtype, device) if rank == 0 else 0.0
        dist.barrier()
        together = sustained_block_rate(dtype, device) if rank < on_host else 0.0
        out.append((alone, sum_over_world([together])[0]))
    return out


def sharing_value(rounds: list, ranks: int) -> tuple[float, str]:
    """(shared_cores, how measured): how many ranks run at full rate, the median over the rounds
    of together / alone, at least 1."""
    ratios = [together / alone for alone, together in rounds if alone > 0]
    value = max(1.0, statistics.median(ratios)) if ratios else 1.0
    return value, (f"{ranks} ranks at once against one alone, decoder block passes in "
                   f"{len(rounds)} interleaved rounds: " + ", ".join(
                       f"{t:.1f} / {a:.1f}" for a, t in rounds) + " per second")
