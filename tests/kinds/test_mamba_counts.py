"""The SSD scan's FLOP count (counts.ssd_scan_flops, what the cost model prices and `plait
calibrate` divides its scan time by) against torch's FLOP counter on the scan the runtime runs."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from plait.ir import counts
from plait.ir.model import Mamba2
from plait.lowering.modules.ssd import ssd_chunked


@pytest.mark.parametrize("batch,seq,heads,head_dim,state,chunk", [
    (1, 512, 4, 64, 128, 128),   # Nemotron-H's head width, state and chunk
    (2, 256, 8, 32, 16, 32),     # tiny-hybrid's
    (1, 256, 2, 64, 64, 64),
])
def test_scan_flops_equal_what_the_scan_executes(batch, seq, heads, head_dim, state, chunk):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq, heads, head_dim, generator=gen)
    b, c = (torch.randn(batch, seq, 1, state, generator=gen) for _ in range(2))
    dt = torch.rand(batch, seq, heads, generator=gen) * 0.1
    a = -torch.rand(heads, generator=gen)
    with FlopCounterMode(display=False) as counter:
        ssd_chunked(x, dt, a, b, c, chunk)
    block = Mamba2(heads=heads, head_dim=head_dim, groups=1, state=state, chunk=chunk)
    assert counts.ssd_scan_flops(block, batch * seq, seq) == counter.get_total_flops()


def test_scan_flops_split_over_tensor_parallel_heads():
    block = Mamba2(heads=8, head_dim=64, groups=1, state=128, chunk=128)
    assert counts.ssd_scan_flops(block, 4096, 4096, tp=2) == pytest.approx(
        counts.ssd_scan_flops(block, 4096, 4096) / 2)
