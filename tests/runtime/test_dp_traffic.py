"""Tier 2: the bytes ZeRO-1 puts on the data-parallel group in one training step are those the cost
model prices (counts.dp_traffic_bytes): under bf16 the gradients reduced in fp32 (4 bytes per
parameter) and the updated parameters gathered in bf16 (2), under fp32 4 and 4. Counted at
torch.distributed's entry points on two gloo ranks (tiny-local dp2 zero1, its second step), the
step's scalar reductions (loss, norm) aside. Gloo reduce-scatters by all-reducing the whole
buffer (lowering/collectives.py): its all-reduces are the reduction's calls."""
import dataclasses
import functools
from pathlib import Path

import pytest
import torch.distributed as dist

from plait.ir import counts
from plait.ir.dsl import load_job
from plait.ir.job import Precision
from plait.ir.plan import Layout
from plait.lowering import collectives as cc

from dist_util import spawn

pytestmark = pytest.mark.tier2

JOB = Path(__file__).resolve().parents[2] / "specs" / "jobs" / "tiny-local.plait"
PRECISIONS = ("bf16", "fp32")


def _recording(calls: list, name: str, fn):
    @functools.wraps(fn)
    def call(tensor_a, tensor_b=None, *args, group=None, **kwargs):
        out = tensor_a  # all_reduce(tensor), all_gather_into_tensor(output, input)
        if group is cc.axis_group("dp-cp") and out.numel() > 1:
            calls.append((name, out.numel(), out.element_size()))
        if tensor_b is None:
            return fn(tensor_a, *args, group=group, **kwargs)
        return fn(tensor_a, tensor_b, *args, group=group, **kwargs)
    return call


def _worker(rank: int, world: int) -> dict:
    from plait.runtime.harness.step_probe import trainer_for

    out = {}
    for precision in PRECISIONS:
        job = dataclasses.replace(load_job(str(JOB)), precision=Precision(precision))
        trainer = trainer_for(job, Layout(dp=2, dp_kind="zero1"))
        trainer.train_step(0, 2)
        calls: list = []
        saved = {n: getattr(dist, n) for n in ("all_reduce", "all_gather_into_tensor")}
        for name, fn in saved.items():
            setattr(dist, name, _recording(calls, name, fn))
        try:
            trainer.train_step(1, 2)
        finally:
            for name, fn in saved.items():
                setattr(dist, name, fn)
        padded = sum(f.size * f.dp for f in trainer.dp.flats)
        params = sum(p.numel() for p in trainer.dp.named.values())
        out[precision] = {"calls": calls, "padded": padded, "params": params,
                          "flats": len(trainer.dp.flats)}
    return out


@pytest.fixture(scope="module")
def traffic():
    return spawn(_worker, 2)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_zero1_moves_the_bytes_the_cost_model_prices(traffic, precision):
    gather_b, reduce_b = counts.dp_traffic_bytes(precision)
    for rank in traffic:
        r = rank[precision]
        moved = {}
        for name, numel, size in r["calls"]:
            moved[name] = moved.get(name, 0) + numel * size
        assert moved["all_gather_into_tensor"] == gather_b * r["padded"], r["calls"]
        assert moved["all_reduce"] == reduce_b * r["padded"], r["calls"]
        # each flat pads its parameters to a multiple of dp = 2: under 2 elements per flat
        assert 0 <= r["padded"] - r["params"] < 2 * r["flats"]
