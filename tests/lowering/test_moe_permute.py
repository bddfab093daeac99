"""Tier 1: permute / unpermute by expert, capacity dropping and padding, chunk sorting, expert
sharding, and the expert-parallel MoE on one rank (EP1) against the reference block."""
import pytest
import torch

from plait.ir.job import MoEOptions
from plait.ir.model import MoE
from plait.lowering.modules import routing
from plait.lowering.modules.moe import MoEBlock
from plait.lowering.moe import (ExpertGrid, ExpertParallelMoE, drop_over_capacity, permute,
                                shard_experts, unpermute)
from plait.lowering.moe.dispatch import sort_chunks, unsort_chunks

torch.set_num_threads(1)


def routed(t=24, e=8, k=2, h=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g)
    logits = torch.randn(t, e, generator=g) * 2
    weights = torch.softmax(logits, -1).topk(k).values
    return x, logits.topk(k).indices, weights


def test_permute_sorts_rows_by_expert_and_unpermute_inverts():
    x, idx, w = routed()
    rows, perm = permute(x, idx, w, 8)
    assert rows.shape == (24 * 2, 6) and perm.counts.tolist() == torch.bincount(idx.flatten(), minlength=8).tolist()
    experts_of_rows = torch.repeat_interleave(torch.arange(8), perm.counts)
    for r in range(rows.shape[0]):  # each row is its token's hidden state, under one of its chosen experts
        assert torch.equal(rows[r], x[perm.token[r]]) and experts_of_rows[r] in idx[perm.token[r]]
    # identity experts: each token comes back as the sum of its weights times itself
    torch.testing.assert_close(unpermute(rows, perm), x * w.sum(-1, keepdim=True))


def test_rows_of_an_expert_keep_token_order():
    x, idx, w = routed(t=40)
    _, perm = permute(x, idx, w, 8)
    for chunk in torch.split(perm.token, perm.counts.tolist()):
        assert torch.equal(chunk, chunk.sort().values)


def test_dropped_choices_get_no_row():
    x, idx, w = routed()
    w2, idx2 = drop_over_capacity(w, idx, 8, factor=0.5, policy="position")
    rows, perm = permute(x, idx2, w2, 8)
    cap = routing.expert_capacity(24, 2, 8, 0.5)
    assert int(perm.counts.max()) <= cap and rows.shape[0] == int((idx2 < 8).sum()) < 48
    kept = idx2 < 8
    expected = (x.unsqueeze(1) * (w2 * kept).unsqueeze(-1)).sum(1)
    torch.testing.assert_close(unpermute(rows, perm), expected)


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_semantics(policy):
    x, idx, w = routed(t=32, seed=3)
    cap = routing.expert_capacity(32, 2, 8, 1.0)
    w2, idx2 = drop_over_capacity(w, idx, 8, factor=1.0, policy=policy)
    for e in range(8):
        routed_here = (idx == e).any(-1).nonzero().flatten()
        kept = (idx2 == e).any(-1).nonzero().flatten()
        assert len(kept) == min(cap, len(routed_here))
        if policy == "position":  # the earliest tokens survive
            assert torch.equal(kept, routed_here[: len(kept)])
        else:  # the highest-weight tokens survive
            wt = (w * (idx == e)).sum(-1)
            assert wt[kept].min() >= wt[routed_here].topk(len(kept)).values.min()
    assert (idx2 == 8).any(), "factor 1.0 on skewed routing drops something"
    assert torch.equal(w2 == 0, idx2 == 8)


def test_padding_to_capacity_changes_no_output():
    x, idx, w = routed(t=32, seed=5)
    w2, idx2 = drop_over_capacity(w, idx, 8, factor=1.0, policy="probs")
    cap = routing.expert_capacity(32, 2, 8, 1.0)
    rows, perm = permute(x, idx2, w2, 8)
    prow, pperm = permute(x, idx2, w2, 8, pad_to=cap)
    assert prow.shape[0] == 8 * cap and pperm.counts.tolist() == [cap] * 8
    pad = pperm.token == 32
    assert int(pad.sum()) == 8 * cap - rows.shape[0]
    assert torch.all(prow[pad] == 0) and torch.all(pperm.weight[pad] == 0)
    y, py = torch.tanh(rows) + 1, torch.tanh(prow) + 1  # nonzero on padding rows too
    torch.testing.assert_close(unpermute(py, pperm), unpermute(y, perm))
    with pytest.raises(ValueError, match="capacity"):
        permute(x, idx, w, 8, pad_to=1)


def test_an_expert_with_no_tokens_and_a_rank_with_none():
    x, idx, w = routed()
    idx = idx % 4  # experts 4..7 get nothing
    rows, perm = permute(x, idx, w, 8)
    assert perm.counts[4:].sum() == 0
    empty_rows, empty = permute(x[:0], idx[:0], w[:0], 8)
    assert empty_rows.shape == (0, 6) and unpermute(empty_rows, empty).shape == (0, 6)
    _, padded = permute(x[:0], idx[:0], w[:0], 8, pad_to=2)
    assert padded.counts.tolist() == [2] * 8


def test_sort_chunks_round_trip():
    sizes = torch.tensor([[2, 0, 1], [1, 3, 0]])  # [sources, experts]
    rows = torch.arange(int(sizes.sum())).float().unsqueeze(-1)
    by_expert = sort_chunks(rows, sizes)
    # expert 0: source 0 rows 0,1 then source 1 row 3; expert 1: source 1 rows 4..6; expert 2: row 2
    assert by_expert.flatten().tolist() == [0, 1, 3, 4, 5, 6, 2]
    assert torch.equal(unsort_chunks(by_expert, sizes), rows)


def test_shard_experts_pairs_gate_and_up_rows():
    e, f, h = 4, 6, 3
    up = torch.arange(e * 2 * f * h).float().view(e, 2 * f, h)
    down = torch.arange(e * h * f).float().view(e, h, f)
    grid = ExpertGrid(experts=4, ep=2, etp=3, ep_rank=1, etp_rank=2)
    u, d = shard_experts(up, down, grid, gated=True)
    assert u.shape == (2, 4, 3) and d.shape == (2, 3, 2)
    torch.testing.assert_close(u, torch.cat([up[2:, 4:6], up[2:, 10:12]], dim=1))
    torch.testing.assert_close(d, down[2:, :, 4:6])
    with pytest.raises(ValueError, match=r"experts \(6\) must be divisible by ep \(4\): 6 % 4 = 2"):
        ExpertGrid(experts=6, ep=4)


def block(spec, options=None, seed=0):
    torch.manual_seed(seed)
    b = MoEBlock(spec, 16, options)
    with torch.no_grad():
        for p in b.parameters():
            p.normal_(0, 0.3)
    return b


@pytest.mark.parametrize("options", [None, MoEOptions(capacity_factor=0.75, drop_policy="position"),
                                     MoEOptions(capacity_factor=0.75, pad_to_capacity=True),
                                     MoEOptions(dispatcher="allgather", capacity_factor=0.75)])
def test_single_rank_expert_parallel_moe_equals_reference(options):
    spec = MoE(experts=8, top_k=2, ffn=8, shared_ffn=12, shared_gate=True, aux_loss=0.01, z_loss=0.001)
    ref = block(spec, options)
    mine = ExpertParallelMoE.from_reference(ref, ExpertGrid(experts=8), options)
    x = torch.randn(2, 10, 16)
    xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, out_m = ref(xr), mine(xm)
    torch.testing.assert_close(out_m, out_r, rtol=1e-5, atol=1e-6)
    out_r.square().sum().backward()
    out_m.square().sum().backward()
    torch.testing.assert_close(xm.grad, xr.grad, rtol=1e-5, atol=1e-6)
    for name, p in mine.named_parameters():
        torch.testing.assert_close(p.grad, ref.get_parameter(name).grad, rtol=1e-5, atol=1e-6)
    assert mine.grad_groups()["experts.w_down"] == "expert" and mine.grad_groups()["router.weight"] == "dense"


def test_meta_tensors_only_propagate_shapes():
    """Compile-time shape propagation runs the layer on meta tensors (lowering/trace.py
    record_shapes): the output has the input's shape and no routing or collective runs."""
    spec = MoE(experts=4, top_k=2, ffn=8)
    mine = ExpertParallelMoE.from_reference(block(spec), ExpertGrid(experts=4)).to("meta")
    out = mine(torch.zeros(2, 3, 16, device="meta"))
    assert out.shape == (2, 3, 16) and out.is_meta
