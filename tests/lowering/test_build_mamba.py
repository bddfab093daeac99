"""The Mamba2 reference block: SSD chunked scan == sequential recurrence, causality, init,
TP-friendliness (per-component sharding reproduces the block), fx-traceability of a hybrid model."""
import copy

import pytest
import torch

from trace_check_util import call_function_names, traced_and_checked

from plait.ir.model import MLP, Attention, Mamba2, ModelSpec
from plait.lowering.build import build_model
from plait.lowering.modules import ssd
from plait.lowering.modules.mamba import Mamba2Mixer

torch.set_num_threads(1)

SPEC = Mamba2(heads=8, head_dim=4, groups=2, state=8, conv=4, chunk=8)


def scan_inputs(b=2, s=19, h=4, p=3, g=2, n=5, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)  # noqa: E731
    dt = torch.rand(b, s, h, generator=gen, dtype=dtype) * 0.8
    A = -torch.rand(h, generator=gen, dtype=dtype) * 3
    return r(b, s, h, p), dt, A, r(b, s, g, n), r(b, s, g, n)


@pytest.mark.parametrize("chunk", [1, 4, 5, 19, 32])
def test_chunked_scan_equals_sequential_recurrence(chunk):
    x, dt, A, B, C = scan_inputs()
    torch.testing.assert_close(ssd.ssd_chunked(x, dt, A, B, C, chunk), ssd.ssd_sequential(x, dt, A, B, C),
                               rtol=1e-10, atol=1e-10)


def test_chunked_scan_gradients_equal_sequential():
    inputs = [t.requires_grad_() for t in scan_inputs(s=11)]
    grads_seq = torch.autograd.grad(ssd.ssd_sequential(*inputs).sin().sum(), inputs)
    grads_chunk = torch.autograd.grad(ssd.ssd_chunked(*inputs, 4).sin().sum(), inputs)
    for a, b in zip(grads_seq, grads_chunk):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def mixer(seed=0):
    torch.manual_seed(seed)
    m = Mamba2Mixer(SPEC, 32, 1e-5)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return m


def test_mixer_is_causal():
    m = mixer()
    x = torch.randn(2, 20, 32)
    changed = x.clone()
    changed[:, 12:] += 1.0
    torch.testing.assert_close(m(x)[:, :12], m(changed)[:, :12], rtol=0, atol=0)


def test_mamba_init_ranges():
    m = build_model(ModelSpec(name="h", vocab=32, hidden=32, layers=("mamba",), mamba=SPEC), seed=0).layers[0].mixer
    A = torch.exp(m.A_log)
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert ((A >= 1) & (A <= 16)).all() and torch.equal(m.D, torch.ones(8))
    assert ((dt >= 1e-3 - 1e-7) & (dt <= 0.1 + 1e-7)).all()
    assert torch.equal(m.norm.weight, torch.ones(32))


def _rows(parts, rank, tp):
    """Indices of this rank's slice of each consecutive part of the given sizes."""
    out, offset = [], 0
    for size in parts:
        out.append(torch.arange(offset + rank * size // tp, offset + (rank + 1) * size // tp))
        offset += size
    return torch.cat(out)


def test_per_component_tp_sharding_reproduces_the_mixer():
    """TP2 by hand: in_proj rows of z, x, B, C, dt each halved, conv channels of x, B, C halved,
    A_log / D / dt_bias per head, norm per channel, out_proj columns; summing the two row-parallel
    partial outputs gives the full mixer. Nothing in forward bakes a width or a head count."""
    full = mixer()
    d, gn, h = SPEC.d_inner, SPEC.groups * SPEC.state, SPEC.heads
    x = torch.randn(2, 13, 32)
    partial = []
    for rank in range(2):
        shard = copy.deepcopy(full)
        in_rows, conv_rows = _rows([d, d, gn, gn, h], rank, 2), _rows([d, gn, gn], rank, 2)
        heads, inner = _rows([h], rank, 2), _rows([d], rank, 2)
        with torch.no_grad():
            shard.in_proj.weight = torch.nn.Parameter(full.in_proj.weight[in_rows])
            shard.conv1d.weight = torch.nn.Parameter(full.conv1d.weight[conv_rows])
            shard.conv1d.bias = torch.nn.Parameter(full.conv1d.bias[conv_rows])
            for name in ("A_log", "D", "dt_bias"):
                setattr(shard, name, torch.nn.Parameter(getattr(full, name)[heads]))
            shard.norm.weight = torch.nn.Parameter(full.norm.weight[inner])
            shard.out_proj.weight = torch.nn.Parameter(full.out_proj.weight[:, inner])
        partial.append(shard(x))
    torch.testing.assert_close(partial[0] + partial[1], full(x), rtol=1e-5, atol=1e-5)


def test_hybrid_model_traces_with_scan_and_conv_as_single_nodes():
    spec = ModelSpec(name="h", vocab=64, hidden=32, layers=("mamba", "attention", "mlp", "mamba"),
                     attention=Attention(4, 2, 8, rope=None), mlp=MLP(48, "relu2"), mamba=SPEC)
    gm = traced_and_checked(build_model(spec), torch.randint(0, 64, (2, 21)))
    targets = call_function_names(gm)
    assert targets.count("ssd_scan") == 2 and targets.count("causal_conv1d") == 2


def test_bf16_hybrid_moe_model_keeps_sensitive_tensors_fp32():
    from plait.ir.model import MoE, Rope
    spec = ModelSpec(name="h", vocab=64, hidden=32, layers=("mamba", "attention", "moe", "mlp"), max_seq=64,
                     attention=Attention(4, 2, 8, rope=Rope()), mlp=MLP(48, "relu2"), mamba=SPEC,
                     moe=MoE(8, 2, 16, shared_ffn=16, router="sigmoid", expert_bias=True, aux_loss=0.01))
    m16, m32 = build_model(spec, dtype=torch.bfloat16), build_model(spec)
    attn, moe, mamba = (m16.layers[i].mixer for i in (1, 2, 0))
    assert attn.inv_freq.dtype == moe.router.weight.dtype == moe.expert_bias.dtype == torch.float32
    assert mamba.A_log.dtype == torch.float32 and mamba.in_proj.weight.dtype == torch.bfloat16
    tokens = torch.randint(0, 64, (2, 16))
    loss16 = m16(tokens, tokens)
    loss16.backward()
    assert abs(loss16.item() - m32(tokens, tokens).item()) < 0.05
