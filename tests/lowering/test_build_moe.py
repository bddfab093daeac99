"""The MoE reference block: routers, grouped experts, aux / z losses, capacity dropping, bias update."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from trace_check_util import call_function_names, traced_and_checked

from plait.ir.job import MoEOptions
from plait.ir.model import Attention, ModelSpec, MoE, Rope
from plait.lowering.build import build_model
from plait.lowering.modules import experts as experts_mod
from plait.lowering.modules import routing
from plait.lowering.modules.moe import MoEBlock, update_expert_bias

torch.set_num_threads(1)

ROUTE = dict(groups=1, topk_groups=1, scaling_factor=1.0)


def logits(t=12, e=8, seed=0):
    return torch.randn(t, e, generator=torch.Generator().manual_seed(seed)) * 2


def test_softmax_router_variants():
    x = logits()
    w, i, _ = routing.route(x, None, top_k=2, router="softmax", pre_softmax=False, norm_topk=True, **ROUTE)
    torch.testing.assert_close(w, torch.softmax(x.topk(2).values, -1))
    w2, i2, aux = routing.route(x, None, top_k=2, router="softmax", pre_softmax=True, norm_topk=False, **ROUTE)
    assert torch.equal(i, i2)
    torch.testing.assert_close(w2, torch.softmax(x, -1).topk(2).values)
    torch.testing.assert_close(aux, torch.softmax(x, -1))
    w3, _, _ = routing.route(x, None, top_k=2, router="softmax", pre_softmax=True, norm_topk=True, **ROUTE)
    torch.testing.assert_close(w3, w, rtol=1e-6, atol=1e-7)  # Mixtral: both spellings agree


def test_sigmoid_router_bias_selects_only_and_scaling_applies():
    x = logits()
    bias = torch.zeros(8)
    bias[5] = 10.0  # expert 5 is always chosen ...
    w, i, _ = routing.route(x, bias, top_k=2, router="sigmoid", pre_softmax=False, norm_topk=False,
                            groups=1, topk_groups=1, scaling_factor=2.5)
    assert (i == 5).any(-1).all()
    # ... but its weight is its unbiased score, times the scaling factor
    torch.testing.assert_close(w, torch.sigmoid(x).gather(1, i) * 2.5)
    wn, _, _ = routing.route(x, bias, top_k=2, router="sigmoid", pre_softmax=False, norm_topk=True, **ROUTE)
    torch.testing.assert_close(wn.sum(-1), torch.ones(12))


def test_group_limited_routing_picks_from_best_groups():
    x = logits(t=64, e=8)
    i = routing.select_experts(torch.sigmoid(x), top_k=2, groups=4, topk_groups=1)
    assert torch.equal(i[:, 0] // 2, i[:, 1] // 2)  # both choices in the one eligible group
    scores = torch.sigmoid(x).view(64, 4, 2).topk(2, dim=-1).values.sum(-1)
    assert torch.equal(i[:, 0] // 2, scores.argmax(-1))


def test_aux_loss_formula():
    x = logits(t=16)
    w, i, probs = routing.route(x, None, top_k=2, router="softmax", pre_softmax=True, norm_topk=True, **ROUTE)
    counts = routing.tokens_per_expert(i, 8)
    frac_tokens, frac_probs = counts.float() / (16 * 2), probs.mean(0)
    expected = 0.01 * 8 * (frac_tokens * frac_probs).sum()
    torch.testing.assert_close(routing.load_balancing_loss(probs, counts, 2, 0.01), expected)


def moe_spec(**kw):
    base = dict(experts=8, top_k=2, ffn=16, shared_ffn=24, shared_gate=True)
    return MoE(**(base | kw))


def block(spec=None, options=None, segments=1, seed=0, cp=1):
    torch.manual_seed(seed)
    b = MoEBlock(spec or moe_spec(), 32, options, segments, cp)
    with torch.no_grad():
        for p in b.parameters():
            p.normal_(0, 0.3)
    return b


def naive_moe(b: MoEBlock, x, keep=None):
    """Per token: sum over its chosen experts of weight * expert(x) (+ gated shared expert)."""
    s, flat = b.spec, x.reshape(-1, x.shape[-1])
    w, idx, _ = routing.route(b.router(flat), getattr(b, "expert_bias", None), top_k=s.top_k, router=s.router,
                              pre_softmax=s.pre_softmax, norm_topk=s.norm_topk, groups=s.groups,
                              topk_groups=s.topk_groups, scaling_factor=s.scaling_factor)
    keep = torch.ones_like(idx, dtype=torch.bool) if keep is None else keep
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for j in range(s.top_k):
            if keep[t, j]:
                e = idx[t, j]
                h = flat[t] @ b.experts.w_gate_up[e].T
                h = F.silu(h[:16]) * h[16:] if s.activation == "swiglu" else F.relu(h).square()
                out[t] += w[t, j] * (h @ b.experts.w_down[e].T)
    if s.shared_ffn:
        out = out + torch.sigmoid(b.shared_gate(flat)) * b.shared(flat) if s.shared_gate else out + b.shared(flat)
    return out.view_as(x)


@pytest.mark.parametrize("spec", [moe_spec(), moe_spec(activation="relu2", shared_gate=False, router="sigmoid",
                                                       expert_bias=True, groups=2, topk_groups=1,
                                                       scaling_factor=2.0)])
def test_dropless_block_equals_per_token_loop(spec):
    b = block(spec)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(b(x), naive_moe(b, x), rtol=1e-5, atol=1e-5)


def test_grouped_mm_and_loop_agree(monkeypatch):
    b = block()
    x = torch.randn(2, 7, 32, requires_grad=True)
    out = b(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in b.parameters()]
    monkeypatch.setattr(experts_mod, "grouped_mm_works", lambda *a: False)
    b.zero_grad()
    x2 = x.detach().requires_grad_()
    out2 = b(x2)
    out2.square().sum().backward()
    torch.testing.assert_close(out, out2, rtol=0, atol=1e-6)
    for g, p in zip(grads, b.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)


def test_aux_and_z_loss_gradients_reach_the_router():
    spec = moe_spec(aux_loss=0.1, z_loss=0.01)
    with_aux, plain = block(spec), block(dataclasses.replace(spec, aux_loss=0.0, z_loss=0.0))
    plain.load_state_dict(with_aux.state_dict())
    x, g = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    out = with_aux(x)
    (out * g).sum().backward()
    flat = x.reshape(-1, 32)
    logits_ = plain.router(flat)
    _, idx, probs = routing.route(logits_, None, top_k=2, router="softmax", pre_softmax=False, norm_topk=True, **ROUTE)
    aux = routing.load_balancing_loss(probs, routing.tokens_per_expert(idx, 8), 2, 0.1) + routing.z_loss(logits_, 0.01)
    out_plain = plain(x)
    (out_plain * g).sum().backward(retain_graph=True)
    without_aux = plain.router.weight.grad.clone()
    aux.backward()
    assert torch.equal(out, out_plain)  # attaching the loss leaves the forward value alone
    assert (without_aux - plain.router.weight.grad).abs().max() > 1e-4  # the losses matter here
    torch.testing.assert_close(with_aux.router.weight.grad, plain.router.weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_drops_over_capacity_tokens(policy):
    opts = MoEOptions(capacity_factor=0.5, drop_policy=policy)
    b = block(moe_spec(shared_ffn=0, shared_gate=False), opts)
    x = torch.randn(2, 8, 32)
    flat = x.reshape(-1, 32)
    w, idx, _ = routing.route(b.router(flat), None, top_k=2, router="softmax", pre_softmax=False, norm_topk=True, **ROUTE)
    keep = routing.capacity_keep(w, idx, 8, 0.5, policy)
    cap = routing.expert_capacity(16, 2, 8, 0.5)
    kept_counts = torch.bincount(idx[keep], minlength=8)
    assert cap == 2 and (kept_counts <= cap).all() and not keep.all()
    for e in range(8):  # the kept tokens are the best (probs) / earliest (position) of each expert
        rows = (idx == e).nonzero()
        if len(rows) > cap:
            rank_key = -w[rows[:, 0], rows[:, 1]] if policy == "probs" else rows[:, 0].float()
            expected = rows[rank_key.argsort()[:cap]]
            assert sorted(map(tuple, expected.tolist())) == sorted(map(tuple, (keep & (idx == e)).nonzero().tolist()))
    torch.testing.assert_close(b(x), naive_moe(b, x, keep), rtol=1e-5, atol=1e-5)


def test_capacity_segments_apply_per_sequence_chunk():
    opts = MoEOptions(capacity_factor=0.5, drop_policy="position")
    whole, split = block(options=opts), block(options=opts, segments=2)
    x = torch.randn(2, 8, 32)
    halves = [whole(x[:, :4]), whole(x[:, 4:])]  # what two sequence-parallel ranks compute
    torch.testing.assert_close(split(x), torch.cat(halves, dim=1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(whole(x), split(x))


@pytest.mark.parametrize("tp", [1, 2])
def test_capacity_segments_follow_the_zigzag_chunks_of_context_parallel_ranks(tp):
    """cp = 2: rank r holds chunks r and 3 - r of 4; its (SP-split) tokens are one segment each."""
    opts = MoEOptions(capacity_factor=0.5, drop_policy="position")
    whole, split = block(options=opts), block(options=opts, segments=2 * tp, cp=2)
    x = torch.randn(2, 16, 32)
    c = x.chunk(4, dim=1)
    ranks = [torch.cat((c[0], c[3]), 1), torch.cat((c[1], c[2]), 1)]  # what the CP ranks hold
    outs = [torch.cat([whole(part) for part in local.chunk(tp, dim=1)], 1) for local in ranks]
    halves = [o.chunk(2, dim=1) for o in outs]
    expected = torch.cat([halves[0][0], halves[1][0], halves[1][1], halves[0][1]], dim=1)
    torch.testing.assert_close(split(x), expected, rtol=1e-5, atol=1e-5)
    if tp == 1:  # (with tp = 2 every segment is one chunk: zigzag and contiguous cuts coincide)
        assert not torch.allclose(split(x), block(options=opts, segments=2)(x))


def test_expert_bias_update_balances_load():
    b = block(moe_spec(router="sigmoid", expert_bias=True)).train()
    b(torch.randn(2, 8, 32))
    load = b.expert_load.clone()
    assert load.sum() == 2 * 8 * 2
    update_expert_bias(b, 0.01)
    torch.testing.assert_close(b.expert_bias, 0.01 * torch.sign(load.mean() - load))
    assert b.expert_load.sum() == 0


def test_model_with_moe_traces_and_keeps_router_at_least_fp32():
    spec = ModelSpec(name="m", vocab=64, hidden=32, layers=("attention", "moe") * 2, max_seq=32,
                     attention=Attention(4, 2, 8, rope=Rope()), moe=moe_spec(aux_loss=0.01, z_loss=0.001))
    m = build_model(spec, dtype=torch.bfloat16, moe_options=MoEOptions(capacity_factor=1.0))
    assert m.layers[1].mixer.router.weight.dtype == torch.float32
    assert m.layers[1].mixer.experts.w_gate_up.dtype == torch.bfloat16
    assert build_model(spec, dtype=torch.float64).layers[1].mixer.router.weight.dtype == torch.float64
    m = build_model(spec, moe_options=MoEOptions(capacity_factor=1.0))
    gm = traced_and_checked(m, torch.randint(0, 64, (2, 16)))
    targets = set(call_function_names(gm))
    assert {"route", "capacity", "permute_tokens", "expert_mlp", "unpermute_tokens"} <= targets


def test_fp32_tensors_of_a_bf16_model_are_not_rounded_through_bf16():
    spec = ModelSpec(name="m", vocab=64, hidden=32, layers=("attention", "moe"), max_seq=32,
                     attention=Attention(4, 2, 8, rope=Rope()), moe=moe_spec())
    m16, m32 = build_model(spec, dtype=torch.bfloat16), build_model(spec)
    assert torch.equal(m16.layers[1].mixer.router.weight, m32.layers[1].mixer.router.weight)
    assert torch.equal(m16.layers[0].mixer.inv_freq, m32.layers[0].mixer.inv_freq)
