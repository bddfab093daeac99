"""Tier 2: under context parallelism the Mamba2 conv and scan (lowering/mamba_cp.py, cp = 2 on two
gloo ranks) keep for backward exactly what ir/counts.mamba_cp_saved_bytes adds to the reference
ops' bytes, in fp32 and bf16: every saved storage counted once beyond the inputs and weights. The
formula is the busiest rank's: with chunks shorter than the head dim the first rank, whose last
chunk's entering state the recurrence does not keep, and whose first chunk has none."""
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dist_util import spawn
from plait.ir import counts
from plait.ir.dsl import load_file
from plait.lowering.collectives import bind_axis, unbind_all
from plait.lowering.cp_ops import zigzag_shard
from plait.lowering.mamba_cp import cp_causal_conv1d, cp_ssd_scan
from plait.lowering.modules.mamba import causal_conv1d, ssd_scan

SPEC = load_file(Path(__file__).resolve().parents[2] / "specs" / "models" / "tiny-hybrid.plait").models["tiny-hybrid"]
MBS, SEQ, CP = 2, 96, 2  # the rank holds SEQ / CP tokens of each sequence: chunks of 24 < 32


def _kept(fn, inputs) -> int:
    """Bytes of the storages autograd saves during fn(), beyond ``inputs``' own."""
    seen = {t.untyped_storage().data_ptr() for t in inputs}
    total = [0]

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen and storage.nbytes():
            seen.add(storage.data_ptr())
            total[0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.float().sum().backward()
    return total[0]


def _inputs(dtype):
    m = SPEC.mamba
    torch.manual_seed(0)  # the same whole sequences on both ranks
    leaf = lambda *shape: torch.randn(*shape).to(dtype).requires_grad_()  # noqa: E731
    dt = torch.rand(MBS, SEQ, m.heads).to(dtype).requires_grad_()
    a = (-torch.rand(m.heads)).requires_grad_()
    return (leaf(MBS, SEQ, m.conv_channels), leaf(m.conv_channels, 1, m.conv), leaf(m.conv_channels),
            (leaf(MBS, SEQ, m.heads, m.head_dim), dt, a, leaf(MBS, SEQ, m.groups, m.state),
             leaf(MBS, SEQ, m.groups, m.state)))


def _extra(rank: int, dtype) -> int:
    """CP conv + scan on this rank's chunks, less the reference ops on as many tokens."""
    x, w, b, scan = _inputs(dtype)
    local = lambda t: zigzag_shard(t.detach(), CP, rank).requires_grad_()  # noqa: E731
    xl, sl = local(x), [local(t) if t.dim() > 1 else t for t in scan]
    chunk = SPEC.mamba.chunk
    cp = (_kept(lambda: cp_causal_conv1d(xl, w, b, "cp", CP, rank), (xl, w, b))
          + _kept(lambda: cp_ssd_scan(*sl, chunk, "cp", CP, rank), sl))
    plain = (_kept(lambda: causal_conv1d(xl, w, b), (xl, w, b))
             + _kept(lambda: ssd_scan(*sl, chunk), sl))
    return cp - plain


def _probe(rank: int, world: int) -> dict:
    bind_axis("cp", dist.group.WORLD, (0, 1))
    got = {str(d): _extra(rank, d) for d in (torch.float32, torch.bfloat16)}
    unbind_all()
    return got


@pytest.mark.tier2
def test_cp_forms_keep_what_the_formula_adds():
    got = spawn(_probe, 2)
    m = SPEC.mamba
    for dtype in (torch.float32, torch.bfloat16):
        shape = counts.ActivationShape(tokens=MBS * SEQ / CP, seq=SEQ / CP, tp=1, sp=False,
                                       act_bytes=dtype.itemsize, cp=CP)
        formula = sum(counts.mamba_cp_saved_bytes(SPEC, shape).values())
        chunk = SEQ // (2 * CP)
        assert got[0][str(dtype)] == formula, dtype
        # the second rank: C per head for both chunks, no state of its own
        assert got[1][str(dtype)] == formula - MBS * m.heads * m.state * 4 * (m.head_dim - chunk), dtype


def test_without_cp_nothing_is_added():
    shape = counts.ActivationShape(tokens=256, seq=128, tp=1, sp=False, act_bytes=4)
    assert not any(k.startswith("cp_") for k in counts.mamba_saved_bytes(SPEC, shape))
    assert set(counts.mamba_saved_bytes(SPEC, dataclasses.replace(shape, cp=2))) >= {"cp_conv", "cp_scan"}
