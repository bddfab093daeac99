"""FSDP2's own host work and how much of its collectives its prefetching hides, measured by
`plait calibrate` (issue #17).

Under dp_kind = fsdp the runtime shards each layer unit with torch's fully_shard
(runtime/fsdp.py FullyShard): per micro-batch a unit is all-gathered before its forward and
again before its backward and its gradients are reduce-scattered. The cost model prices those
three collectives (planner/cost/comm.py fsdp_unit) and hides overlap_fsdp of them behind the
unit's compute (pipeline.fsdp_exposed). Around them FSDP2 runs host work of its own: the pre-/
post-forward and backward hooks, the copy-out into the unsharded parameters, the gradients'
chunk-cat and post-division, the DTensor wrapping, the buffers' allocation. Four variants of
``calls`` forward + backward slices of plait's attention + MLP pair (two units), every group of
the node at once, interleaved:

    P  plain
    F  each block fully_shard-ed over the group as the runtime shards it (resharded after
       forward, the neighbour prefetched, sum reduction)
    R  plain, each unit followed by the collectives FSDP2 issues for it (two
       all_gather_single of its parameters, one reduce_scatter_single of its gradients), bare
    H  fully_shard-ed over a group of the rank alone: FSDP2's hooks and copies run, its
       collectives do not (world size 1 skips them)

    fsdp_host_us per unit and micro-batch = (H - P) / units
    hidden = (R - P) + (H - P) - (F - P): what the prefetching saved against doing both in turn
    overlap_fsdp = hidden / min(R - P, P), within [0, 1] (the cost model's hidden =
                   overlap x min(collective, compute))

On the 2-core VM (2026-12-03) F came out above R + H - P: FSDP2 hides nothing of its collectives
there, while a bare all-gather beside GEMMs hides 0.7 (runtime/calibrate_overlap.py), and its host
work is ~1.4 ms per unit and micro-batch; together they left the FSDP rows of
benchmarks/predict_vs_measure.py 35-43% under.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from .calibrate_ops import share_probe_model
from .calibrate_timing import group_mean, synchronize

TOKENS = 16       # tokens per slice: a small micro-batch, where FSDP2's own work shows
CALLS = 16        # slices per timed run
REPEAT = 5        # timed runs of each variant (interleaved); the median is kept


def _gather_fn():
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _scatter_fn():
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class ProbeStage(torch.nn.Module):
    """The blocks as one stage: FSDP2's root, as the runtime's stage module is."""

    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, y):
        for layer in self.layers:
            y = layer(y)
        return y


def shard_like_runtime(layers, group, device):
    """``layers`` fully_shard-ed over ``group`` as runtime/fsdp.py shard_stage shards a stage's
    units: each resharded after forward, the next prefetched in forward and the previous in
    backward, reductions forced to SUM (gloo has no AVG), under a root that holds no parameter
    of its own."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh.from_group(group, device.type, mesh_dim_names=("dp-cp",))
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    stage = ProbeStage(layers)
    fully_shard(stage, mesh=mesh, ignored_params=set(layers.parameters()))
    for k, layer in enumerate(layers):
        if k + 1 < len(layers):
            layer.set_modules_to_forward_prefetch([layers[k + 1]])
        if k > 0:
            layer.set_modules_to_backward_prefetch([layers[k - 1]])
        layer.set_force_sum_reduction_for_comms(True)
    return stage


def bare_unit_collectives(layers, group, n: int, dtype, device):
    """A function issuing, per unit of ``layers``, the three collectives FSDP2 issues for it
    (bare, on flat buffers of its parameters' size padded to the group)."""
    buffers = []
    for layer in layers:
        numel = sum(p.numel() for p in layer.parameters())
        shard = -(-numel // n)
        buffers.append((torch.empty(shard, dtype=dtype, device=device),
                        torch.empty(shard * n, dtype=dtype, device=device)))
    gather, scatter = _gather_fn(), _scatter_fn()

    def issue():
        for small, full in buffers:
            gather(full, small, group=group)
            gather(full, small, group=group)
            scatter(small, full, group=group)
    return issue


def _slices(model, x, after=None):
    def run():
        model(x).sum().backward()
        if after is not None:
            after()
    return run


def _timed(fn, calls: int, device) -> float:
    dist.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return time.perf_counter() - start


def measure_fsdp(rank: int, groups: list[list[int]], dtype, device, calls: int = CALLS,
                 repeat: int = REPEAT) -> dict | None:
    """{units, unit_params, plain_s, fsdp_s, raw_s (seconds per slice), host_s (per unit and
    micro-batch)}, each the mean over the world's ranks in a group, on this rank's group of
    ``groups`` (every rank of the world calls this: each creates every group); None on ranks
    outside all groups."""
    mine = None
    for ranks in groups:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = (group, len(ranks))
    torch.manual_seed(0)
    plain = ProbeStage(share_probe_model().to(device=device, dtype=dtype).layers)
    x = torch.randn(1, TOKENS, 128, dtype=dtype, device=device, requires_grad=True)
    alone = [dist.new_group([r]) for r in range(dist.get_world_size())]  # every rank creates each
    member = mine is not None

    def layers():
        return share_probe_model().to(device=device, dtype=dtype).layers

    if member:
        sharded = shard_like_runtime(layers(), mine[0], device)
        raw = bare_unit_collectives(plain.layers, mine[0], mine[1], dtype, device)
        variants = (_slices(plain, x), _slices(sharded, x), _slices(plain, x, raw))
    else:  # outside every group: keep the host as busy as the members keep theirs
        variants = (_slices(plain, x),) * 3
    variants += (_slices(shard_like_runtime(layers(), alone[rank], device), x),)
    for fn in variants:
        fn()  # warm: FSDP2's lazy init, gloo's pairs, the allocator
    runs: list[list[float]] = [[] for _ in variants]
    for _ in range(repeat):  # interleaved so that a load swing hits every variant alike
        for k, fn in enumerate(variants):
            runs[k].append(_timed(fn, calls, device))
    plain_s, fsdp_s, raw_s, host_s = (group_mean(statistics.median(r) / calls, member)
                                      for r in runs)
    if not member:
        return None
    units = len(plain.layers)
    return {"units": units, "ranks": mine[1],
            "unit_params": sum(p.numel() for p in plain.parameters()) / units,
            **fsdp_point(plain_s, fsdp_s, raw_s, host_s, units)}


def fsdp_point(plain_s: float, fsdp_s: float, raw_s: float, alone_s: float, units: int) -> dict:
    """The four variants' seconds per slice (P, F, R, H of the module docstring) and what they
    give: host_s per unit and micro-batch, and the fraction of the collectives hidden."""
    hidden = (raw_s - plain_s) + (alone_s - plain_s) - (fsdp_s - plain_s)
    window = min(raw_s - plain_s, plain_s)
    return {"plain_s": plain_s, "fsdp_s": fsdp_s, "raw_s": raw_s, "alone_s": alone_s,
            "host_s": max(0.0, alone_s - plain_s) / units,
            "overlap": min(1.0, max(0.0, hidden / window)) if window > 0 else 0.0}


def fsdp_values(points: list) -> tuple[dict, dict]:
    """({fsdp_host_us, overlap_fsdp}, {key: how measured}) from [(group size, measure_fsdp's
    dict)]: the medians over group sizes."""
    host = statistics.median(m["host_s"] for _, m in points)
    overlap = statistics.median(m["overlap"] for _, m in points)
    parts = ", ".join(
        f"x{n}: plain {m['plain_s'] * 1e3:.2f} ms, fully_shard {m['fsdp_s'] * 1e3:.2f} ms, bare "
        f"collectives {m['raw_s'] * 1e3:.2f} ms, fully_shard alone {m['alone_s'] * 1e3:.2f} ms"
        for n, m in points)
    how = (f"forward + backward of plait's attention + MLP pair on {TOKENS} tokens per slice, "
           f"every group at once (runtime/calibrate_fsdp.py): {parts}")
    return ({"fsdp_host_us": host * 1e6, "overlap_fsdp": overlap},
            {"fsdp_host_us": f"{how} -> {host * 1e6:.0f} us per unit and micro-batch",
             "overlap_fsdp": f"{how} -> {overlap:.2f} of the collectives hidden"})
