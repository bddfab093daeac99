"""Tier 2: the context-parallel host probe of `plait calibrate` (runtime/calibrate_cp.py) on two
gloo ranks times the lowering's own CP replacements, and they compute what the reference ops
compute on the whole sequence (so the probe times real work on correctly sharded inputs); the
probe's seconds are timings, checked for structure only. Tier 1: the arithmetic."""
import pytest
import torch
import torch.distributed as dist

from dist_util import spawn
from plait.kinds.attention import parallelize as attention_par
from plait.kinds.mamba import parallelize as mamba_par
from plait.lowering.collectives import bind_axis, seconds_inside, unbind_all
from plait.lowering.cp_ops import zigzag_shard
from plait.runtime.calibrate_cp import (AXIS, CP, INPUTS, TOKENS, cp_values, local_call,
                                        measure_cp, sequence_ops)


def _agreement(rank: int) -> dict:
    """Per op: the largest difference between the CP replacement's output on this rank's chunks
    and the reference output's chunks, forward and input gradients."""
    bind_axis(AXIS, dist.group.WORLD, (0, 1))
    out = {}
    for kind, inputs in INPUTS.items():
        ops = sequence_ops(kind)
        torch.manual_seed(0)  # the same whole sequence on both ranks
        for name, args in inputs(CP * TOKENS, torch.float64, torch.device("cpu")):
            ref = ops[name][0](*args)
            fn, local = local_call(ops[name][1], args, rank)
            got = fn(*local)
            seed = torch.randn_like(ref)
            ref.backward(seed)
            with seconds_inside() as inside:
                got.backward(zigzag_shard(seed, CP, rank))
            grads = [(a, b) for a, b in zip(args, local)
                     if isinstance(a, torch.Tensor) and a.dim() > 1 and a.shape[1] == CP * TOKENS]
            out[name] = {
                "forward": (got - zigzag_shard(ref, CP, rank)).abs().max().item(),
                "grads": max((b.grad - zigzag_shard(a.grad, CP, rank)).abs().max().item()
                             for a, b in grads),
                "backward_inside_s": inside[0]}
    unbind_all()
    return out


def _probe(rank: int, world: int) -> dict:
    agreement = _agreement(rank)
    return {"agree": agreement,
            "probe": measure_cp(rank, world, torch.float32, torch.device("cpu"), calls=1, repeat=1)}


@pytest.mark.tier2
def test_the_probe_runs_the_lowerings_cp_ops_on_correct_chunks():
    got = spawn(_probe, 2)
    for rank in got:
        assert set(rank["agree"]) == {"causal_attention", "causal_conv1d", "ssd_scan"}
        for name, a in rank["agree"].items():  # fp64: exact up to summation order
            assert a["forward"] < 1e-10 and a["grads"] < 1e-10, name
            assert a["backward_inside_s"] > 0, name  # each backward exchanges with the peer
    assert got[0]["probe"] == got[1]["probe"]  # every value is the pair's mean
    for kind, m in got[0]["probe"].items():
        assert set(m) == {"plain_s", "cp_s", "inside_s", "host_s"}
        assert m["plain_s"] > 0 and m["cp_s"] > 0 and m["inside_s"] > 0 and m["host_s"] >= 0


def test_the_probe_swaps_in_what_the_lowering_swaps_in():
    ops = {**sequence_ops("attention"), **sequence_ops("mamba")}
    lowered = {s.op.__name__: s.replacement["ring"]
               for s in attention_par.SEQUENCE_OPS + mamba_par.SEQUENCE_OPS if s.communicates}
    assert {name: cp for name, (_, cp) in ops.items()} == lowered
    probed = {name for kind in INPUTS for name, _ in INPUTS[kind](4, torch.float32, "cpu")}
    # packed documents' attention runs the same ring with a key mask: priced as causal attention
    assert probed == set(ops) - {"document_attention"}


def test_host_work_is_the_cp_time_outside_collectives_less_the_reference():
    values, how = cp_values({"mamba": {"plain_s": 0.004, "cp_s": 0.020, "inside_s": 0.009,
                                       "host_s": 0.007}})
    assert values == {"cp_host_us_mamba": pytest.approx(7000.0)}
    assert "9.00 ms inside collectives" in how["cp_host_us_mamba"]


def test_nothing_is_counted_outside_a_collective():
    with seconds_inside() as inside:
        torch.ones(3).sum()
    assert inside[0] == 0.0
