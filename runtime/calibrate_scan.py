"""The SSD scan behind `plait calibrate`: the one the runtime binds on the device (runtime/kernels.py:
mamba-ssm's fused scan on CUDA where it imports, else plait's chunked scan, lowering/modules/ssd.py),
its forward timed at several shapes (heads' width p, state n, chunk l), its backward at the first.

Where the scan runs as separate kernels (plait's eager scan: the CPU), its time per token and head
is more than its products' FLOPs at one rate: each chunk's [l x l] decay and score matrices pass
through elementwise kernels (masked cumulative sums, exp, the product with the scores), work that
grows with l, and a few per-token ones (x dt, B and C per head, the decays to the chunk's end) do
not depend on l at all. Fitted by least squares over the shapes:

    seconds / (tokens x heads) = FLOPs per token and head / (peak x scan_eff)
                                 + scan_chunk_ns x l + scan_token_ns          (x 1e-9)

FLOPs: counts.ssd_scan_flops, what the cost model prices. Timed on the eager scan at shapes of
Nemotron-H's and tiny-hybrid's widths, the last two terms carry most of the spread between them
(one rate alone: 0.65x from one shape to the other). A fused scan (mamba-ssm's Triton kernels on a
GPU) keeps them in registers: where the fit finds no such term it is 0 and the rate is scan_eff.
"""
from __future__ import annotations

import torch

from plait.ir import counts
from plait.ir.model import Mamba2
from plait.lowering.modules import mamba as ref_mamba
from plait.planner.cost.compute import BWD_CORE

from . import kernels
from .calibrate_timing import representative, timed

ROUNDS = 3  # interleaved rounds over the shapes; each keeps its representative (calibrate_timing)


def _inputs(seq: int, heads: int, head_dim: int, state: int, dtype, device):
    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=dtype, device=device) * scale).requires_grad_()
    x, b, c = leaf(1, seq, heads, head_dim), leaf(1, seq, 1, state), leaf(1, seq, 1, state)
    dt = (torch.rand(1, seq, heads, dtype=dtype, device=device) * 0.1).requires_grad_()
    a = (-torch.rand(heads, dtype=dtype, device=device)).requires_grad_()
    return x, dt, a, b, c


def measure_scan(shapes: list[tuple[int, int, int, int, int]], dtype, device) -> dict:
    """{"points": [(seq, heads, head_dim, state, chunk, forward seconds)], "bwd_ratio": the
    backward's rate over the forward's as the cost model charges it, BWD_CORE x forward / backward
    seconds at the first shape, "kernel": what ran}. The scan is the one the runtime binds on this
    device (runtime/kernels.py select: mamba-ssm's fused scan where it imports on CUDA, else plait's
    ssd_chunked_recomputed, whose forward without gradients is ssd_chunked and whose backward
    recomputes it)."""
    scan, kernel = kernels.bound(ref_mamba.ssd_scan, device)
    inputs = [_inputs(seq, heads, head_dim, state, dtype, device)
              for seq, heads, head_dim, state, _ in shapes]
    runs: list[list[float]] = [[] for _ in shapes]
    for _ in range(ROUNDS):  # the shapes in turns: a machine whose speed drifts slows all alike
        for i, ((x, dt, a, b, c), shape) in enumerate(zip(inputs, shapes)):
            with torch.no_grad():
                runs[i].append(timed(lambda: scan(x, dt, a, b, c, shape[4]), device, repeat=3))
    best = [representative(r) for r in runs]
    x, dt, a, b, c = inputs[0]
    both = timed(lambda: scan(x, dt, a, b, c, shapes[0][4]).sum().backward(), device,
                 repeat=3)
    return {"points": [(*shape, t) for shape, t in zip(shapes, best)],
            "bwd_ratio": BWD_CORE * best[0] / max(both - best[0], 1e-9), "kernel": kernel}


def flops_per_token_head(seq: int, heads: int, head_dim: int, state: int, chunk: int) -> float:
    block = Mamba2(heads=heads, head_dim=head_dim, groups=1, state=state, chunk=chunk)
    return counts.ssd_scan_flops(block, seq, seq) / (seq * heads)


def _least_squares(rows: list[list[float]], ys: list[float]) -> list[float]:
    a = torch.tensor(rows, dtype=torch.float64)
    return torch.linalg.lstsq(a, torch.tensor(ys, dtype=torch.float64)[:, None]).solution[:, 0].tolist()


def fit_scan(points: list[tuple], peak: float) -> tuple[float, float, float]:
    """(scan_eff, scan_chunk_ns, scan_token_ns) of the module docstring's law. A term the points
    give a negative coefficient (noise, or a fused kernel without it) is dropped and the rest
    refitted; with too few points, or no positive rate, one rate from the fastest shape."""
    ns = [s / (seq * h) * 1e9 for seq, h, *_, s in points]
    feats = [(flops_per_token_head(*p[:5]), float(p[4]), 1.0) for p in points]
    keep = [0, 1, 2]
    while len(points) >= len(keep):
        coef = _least_squares([[f[k] for k in keep] for f in feats], ns)
        if coef[0] <= 0:
            break
        bad = [k for k, c in zip(keep[1:], coef[1:]) if c < 0]
        if not bad:
            full = dict(zip(keep, coef))
            return 1e9 / (full[0] * peak), full.get(1, 0.0), full.get(2, 0.0)
        keep.remove(bad[0])
    best = max(f[0] / t for f, t in zip(feats, ns))  # FLOPs per ns
    return best * 1e9 / peak, 0.0, 0.0
