"""The Mamba2 mixer keeps for backward exactly the bytes ir/counts.mamba_saved_bytes says: every
saved storage counted once (torch.autograd.graph.saved_tensors_hooks), weights excluded, in fp32 and
bf16, with and without the dt floor, whole and as one tensor-parallel shard."""
import dataclasses
from pathlib import Path

import pytest
import torch

from plait.ir import counts
from plait.ir.dsl import load_file
from plait.lowering.modules.mamba import Mamba2Mixer

SPEC = load_file(Path(__file__).resolve().parents[2] / "specs" / "models" / "tiny-hybrid.plait").models["tiny-hybrid"]


def saved_bytes(mixer: Mamba2Mixer, x: torch.Tensor) -> int:
    weights = {p.untyped_storage().data_ptr() for p in mixer.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = mixer(x)
    out.float().sum().backward()
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dt_min", [0.0, 0.01])
@pytest.mark.parametrize("tp", [1, 2])
def test_mixer_saved_bytes_equal_the_formula(dtype, dt_min, tp):
    m = dataclasses.replace(SPEC.mamba, dt_min=dt_min)
    spec = dataclasses.replace(SPEC, mamba=m)
    shard = dataclasses.replace(m, heads=m.heads // tp, groups=m.groups // tp)  # one TP rank's mixer
    mixer = Mamba2Mixer(shard, spec.hidden, 1e-5)
    torch.manual_seed(0)
    for p in mixer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    mixer.to(dtype)
    for name in Mamba2Mixer.fp32_params:
        getattr(mixer, name).data = getattr(mixer, name).data.float()
    mbs, seq = 3, 80  # not a multiple of the chunk (32)
    x = torch.randn(mbs, seq, spec.hidden, dtype=dtype, requires_grad=True)
    shape = counts.ActivationShape(tokens=mbs * seq, seq=seq, tp=tp, sp=False, act_bytes=dtype.itemsize)
    predicted = counts.mamba_saved_bytes(spec, shape)
    predicted.pop("norm")  # the block's pre-norm, outside the mixer
    assert saved_bytes(mixer, x) == predicted_total(predicted)


def predicted_total(terms: dict) -> int:
    assert all(float(v).is_integer() for v in terms.values()), terms
    return int(sum(terms.values()))


def test_the_scan_keeps_only_its_inputs():
    """Without the recompute the chunked scan alone keeps ~3x the rest of the layer."""
    from plait.lowering.modules import ssd

    x = torch.randn(2, 64, 4, 8, requires_grad=True)
    dt = torch.rand(2, 64, 4, requires_grad=True)
    A = -torch.rand(4, requires_grad=True)
    B, C = (torch.randn(2, 64, 2, 8, requires_grad=True) for _ in range(2))
    inputs = {t.untyped_storage().data_ptr() for t in (x, dt, A, B, C)}

    def kept(fn) -> int:
        extra = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: extra.append(t.untyped_storage().data_ptr()) or t, lambda t: t):
            y = fn(x, dt, A, B, C, 16)
        y.sum().backward()
        return len(set(extra) - inputs)

    assert kept(ssd.ssd_chunked_recomputed) == 0
    assert kept(ssd.ssd_chunked) > 10


def test_recomputed_scan_gives_the_same_values_and_gradients():
    from plait.lowering.modules import ssd

    torch.manual_seed(0)
    leaves = [torch.randn(2, 40, 4, 8), torch.rand(2, 40, 4), -torch.rand(4), torch.randn(2, 40, 2, 8),
              torch.randn(2, 40, 2, 8)]
    results = []
    for fn in (ssd.ssd_chunked, ssd.ssd_chunked_recomputed):
        args = [t.clone().requires_grad_() for t in leaves]
        y = fn(*args, 16)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        results.append([y.detach()] + [a.grad for a in args])
    for a, b in zip(*results):
        assert torch.equal(a, b)
