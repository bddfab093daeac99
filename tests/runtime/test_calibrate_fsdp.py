"""`plait calibrate`'s FSDP probe (runtime/calibrate_fsdp.py): the arithmetic from its four
variants (tier 1), and on two gloo ranks that its bare variant issues exactly the collectives
FSDP2 issues for the same units (tier 2)."""
import collections

import pytest
import torch
import torch.distributed as dist

from dist_util import spawn
from plait.runtime.calibrate_fsdp import (bare_unit_collectives, fsdp_point,
                                          fsdp_values, measure_fsdp, shard_like_runtime)
from plait.runtime.calibrate_ops import share_probe_model


def test_point_splits_host_work_from_what_the_prefetch_hides():
    # plain 2 ms, collectives alone +8 ms, FSDP2's hooks alone +3 ms: FSDP 12 ms hides 1 ms of
    # the 8 behind the 2 ms of compute -> overlap 0.5, host 1.5 ms per unit (two units)
    p = fsdp_point(plain_s=2e-3, fsdp_s=12e-3, raw_s=10e-3, alone_s=5e-3, units=2)
    assert p["host_s"] == pytest.approx(1.5e-3)
    assert p["overlap"] == pytest.approx(0.5)
    # slower than doing both in turn: nothing hidden (clipped at 0), never below 0 host work
    p = fsdp_point(plain_s=2e-3, fsdp_s=20e-3, raw_s=10e-3, alone_s=1e-3, units=2)
    assert p["overlap"] == 0.0 and p["host_s"] == 0.0


def test_values_are_the_medians_over_group_sizes_and_say_how():
    points = [(n, {**fsdp_point(2e-3, f, 10e-3, 5e-3, 2)}) for n, f in ((2, 12e-3), (4, 11e-3),
                                                                        (8, 20e-3))]
    values, how = fsdp_values(points)
    assert values["fsdp_host_us"] == pytest.approx(1500)
    assert values["overlap_fsdp"] == pytest.approx(0.5)  # 0.5, 1.0 and 0.0
    assert "fully_shard" in how["fsdp_host_us"] and "hidden" in how["overlap_fsdp"]


def _counting():
    counts = collections.Counter()
    names = [n for n in ("all_gather_single", "reduce_scatter_single", "all_gather_into_tensor",
                         "reduce_scatter_tensor") if hasattr(dist, n)]
    originals = {n: getattr(dist, n) for n in names}

    def wrap(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)
        return call
    for n in names:
        setattr(dist, n, wrap(n))
    return counts, lambda: [setattr(dist, n, f) for n, f in originals.items()]


def _worker(rank: int, world: int) -> dict:
    group, device = dist.group.WORLD, torch.device("cpu")
    x = torch.randn(1, 8, 128)
    sharded = shard_like_runtime(share_probe_model().layers, group, device)
    sharded(x).sum().backward()  # FSDP2's lazy init
    counts, restore = _counting()
    sharded(x).sum().backward()
    fsdp = dict(counts)
    counts.clear()
    bare_unit_collectives(share_probe_model().layers, group, world, torch.float32, device)()
    bare = dict(counts)
    restore()
    point = measure_fsdp(rank, [list(range(world))], torch.float32, device, calls=2, repeat=1)
    return {"fsdp": fsdp, "bare": bare, "point": point}


@pytest.mark.tier2
def test_bare_variant_issues_what_fsdp2_issues_and_the_probe_reports_per_rank():
    got = spawn(_worker, 2)
    for g in got:
        assert g["fsdp"] == g["bare"] and sum(g["fsdp"].values()) == 6  # 2 units x (2 AG + 1 RS)
        point = g["point"]
        assert point["units"] == 2 and point["ranks"] == 2
        assert point["host_s"] >= 0 and 0.0 <= point["overlap"] <= 1.0
        assert min(point[k] for k in ("plain_s", "fsdp_s", "raw_s", "alone_s")) > 0
