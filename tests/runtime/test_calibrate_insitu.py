"""Tier 2: the in-situ probe of `plait calibrate` (runtime/calibrate_insitu.py) on two gloo ranks
returns, for each op training issues (all-reduce, all-gather, the CP ring's K/V exchange), the
bytes one call moves and non-negative seconds per call. Structure only: the seconds are timings."""
import pytest
import torch

from dist_util import spawn
from plait.runtime.calibrate_insitu import OPS, insitu_latency, measure_insitu


def _probe(rank: int, world: int) -> dict:
    return measure_insitu(rank, [[0, 1]], torch.float32, torch.device("cpu"), calls=2, repeat=1)


@pytest.mark.tier2
def test_the_probe_measures_each_op_training_issues():
    got = spawn(_probe, 2)
    assert got[0] == got[1]  # every value is the group's mean
    ops = got[0]
    assert tuple(ops) == OPS == ("all_reduce", "all_gather", "p2p")
    one = ops["all_reduce"]["bytes"]  # a pair's half of the probe's activation, fp32
    assert one == 8 * 128 * 4
    assert ops["all_gather"]["bytes"] == 2 * one  # the gathered tensor
    assert ops["p2p"]["bytes"] == 2 * one  # a K and a V block sent
    for m in ops.values():
        assert set(m) == {"bytes", "insitu_s", "added_s", "bare_s", "slice_s"}
        assert m["insitu_s"] >= 0 and m["bare_s"] > 0 and m["slice_s"] > 0
    latency = insitu_latency([(2, ops)], 1e9)
    assert [op for op, _ in latency.per_op] == sorted((*OPS, "all_gather_synced"))
    assert all(a >= 0 for _, a in latency.per_op)


def test_a_synced_gather_pays_the_back_to_back_latency_at_most_the_in_situ_one():
    """An all-gather right after another collective finds its peers there: the bare back-to-back
    call's latency (less the bytes' time), never more than the in-situ value."""
    one = {"bytes": 0, "insitu_s": 0.0, "slice_s": 1e-3}
    points = [(2, {"all_gather": {**one, "added_s": 2.0e-3, "bare_s": 0.8e-3},
                   "all_reduce": {**one, "added_s": 3.0e-3, "bare_s": 2.0e-3}}),
              (4, {"all_gather": {**one, "added_s": 3.0e-3, "bare_s": 4.0e-3},
                   "all_reduce": {**one, "added_s": 6.0e-3, "bare_s": 5.0e-3}})]
    per_op = dict(insitu_latency(points, 1e9).per_op)
    # per latency term: 2 ranks one term, 4 ranks three; the 4-rank bare call above in-situ
    assert per_op["all_gather_synced"] == pytest.approx((0.8e-3 + 1.0e-3) / 2)
    assert per_op["all_gather"] == pytest.approx((2.0e-3 + 1.0e-3) / 2)
    assert "all_reduce_synced" not in per_op
