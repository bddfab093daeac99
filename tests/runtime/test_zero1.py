"""ZeRO-1's flat shards (runtime/zero1.py) in one process: the all-gather that publishes the updated
shards moves the parameters' dtype (bf16: 2 bytes per parameter, what counts.dp_traffic_bytes
prices), not the fp32 masters', and writes exactly the values a copy from the masters would."""
import pytest
import torch
from torch import nn

from plait.ir import counts
from plait.runtime import zero1


def _params(dtype):
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(5, 3).to(dtype)), nn.Parameter(torch.randn(4).to(dtype))]


def test_by_dtype_keeps_order_within_and_across_parts():
    a, b = nn.Parameter(torch.zeros(2, dtype=torch.bfloat16)), nn.Parameter(torch.zeros(2))
    c, d = nn.Parameter(torch.zeros(3, dtype=torch.bfloat16)), nn.Parameter(torch.zeros(1))
    parts = zero1.by_dtype([a, b, c, d])
    assert [[id(p) for p in part] for part in parts] == [[id(a), id(c)], [id(b), id(d)]]


def test_a_flat_shard_refuses_mixed_dtypes():
    mixed = [nn.Parameter(torch.zeros(2, dtype=torch.bfloat16)), nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="one dtype"):
        zero1._FlatShard(mixed, dp=2, dp_rank=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_publish_gathers_in_the_parameters_dtype(monkeypatch, dtype):
    params = _params(dtype)
    ranks = [zero1._FlatShard(params, dp=2, dp_rank=r)
             for r in range(2)]
    for r, flat in enumerate(ranks):  # each rank's master moved off the parameters' values
        with torch.no_grad():
            flat.master.add_(0.123456789 * (r + 1))
    assert all(f.master.dtype == torch.float32 for f in ranks)
    moved = []

    def fake_all_gather(x, dim, axis):  # what every rank's shard gathers to
        moved.append((x.dtype, x.numel() * x.element_size()))
        return torch.cat([f.master.detach().to(x.dtype) for f in ranks], dim)

    monkeypatch.setattr(zero1.cc, "all_gather", fake_all_gather)
    ranks[0].publish()
    size = ranks[0].size
    gather_bytes, _ = counts.dp_traffic_bytes("bf16" if dtype == torch.bfloat16 else "fp32")
    assert moved == [(dtype, size * gather_bytes)]
    # the values a copy from the fp32 masters writes (round to nearest even, once)
    full = torch.cat([f.master.detach() for f in ranks])
    expected = torch.empty(sum(p.numel() for p in params), dtype=dtype)
    expected.copy_(full[:expected.numel()])
    got = torch.cat([p.detach().flatten() for p in params])
    assert torch.equal(got, expected)
