"""Tier 2: the in-situ probe of `plait calibrate` (runtime/calibrate_insitu.py) on two gloo ranks
returns, for each op training issues (all-reduce, all-gather, the CP ring's K/V exchange), the
bytes one call moves and non-negative seconds per call. Structure only: the seconds are timings."""
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from plait.runtime.calibrate_insitu import OPS, insitu_latency, measure_insitu
from plait.runtime.mesh import destroy, init_distributed
from plait.runtime.spawn import start_ranks


def _probe(rank: int, world: int, work: str) -> None:
    torch.set_num_threads(1)
    init_distributed("gloo", 120, f"file://{work}/rdzv", rank, world)
    try:
        got = measure_insitu(rank, [[0, 1]], torch.float32, torch.device("cpu"), calls=2, repeat=1)
        Path(work, f"rank{rank}.json").write_text(json.dumps(got))
        dist.barrier()
    finally:
        destroy()


@pytest.mark.tier2
def test_the_probe_measures_each_op_training_issues(tmp_path):
    start_ranks(_probe, (2, str(tmp_path)), 2)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
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
    assert [op for op, _ in latency.per_op] == sorted(OPS)
    assert all(a >= 0 for _, a in latency.per_op)
