"""The dense reference model: contract C4 names, loss, init, fx-traceability, TP-friendliness."""
import copy

import pytest
import torch
import torch.nn.functional as F
from trace_check_util import call_function_names, traced_and_checked

from plait.ir.model import MLP, Attention, ModelSpec, Norm, Rope
from plait.lowering.build import build_model

torch.set_num_threads(1)


def llama_spec(**overrides) -> ModelSpec:
    base = dict(name="t", vocab=64, hidden=32, layers=("attention", "mlp") * 2, max_seq=64,
                attention=Attention(heads=4, kv_heads=2, head_dim=8, rope=Rope(theta=10000.0)),
                mlp=MLP(ffn=48))
    return ModelSpec(**(base | overrides))


def gpt_spec() -> ModelSpec:
    return llama_spec(norm=Norm("layernorm", 1e-5), learned_positions=True, tie_embeddings=True,
                      attention=Attention(heads=4, kv_heads=4, head_dim=8, qkv_bias=True, out_bias=True),
                      mlp=MLP(ffn=64, activation="gelu", bias=True))


def batch(vocab=64, b=2, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, s), generator=g), torch.randint(0, vocab, (b, s), generator=g)


def test_module_tree_names_follow_contract():
    names = set(dict(build_model(llama_spec()).named_parameters()))
    for n in ("embed.weight", "layers.0.norm.weight", "layers.0.mixer.q_proj.weight",
              "layers.0.mixer.k_proj.weight", "layers.0.mixer.v_proj.weight", "layers.0.mixer.o_proj.weight",
              "layers.1.mixer.gate_proj.weight", "layers.1.mixer.up_proj.weight",
              "layers.1.mixer.down_proj.weight", "final_norm.weight", "head.weight"):
        assert n in names, n
    gpt = dict(build_model(gpt_spec()).named_parameters())
    assert "head.weight" not in gpt and "pos_embed.weight" in gpt
    assert "layers.0.mixer.o_proj.bias" in gpt and "layers.1.mixer.gate_proj.weight" not in gpt


def test_loss_is_mean_cross_entropy_of_logits():
    m = build_model(llama_spec())
    tokens, labels = batch()
    logits = m(tokens)
    assert logits.shape == (2, 16, 64)
    expected = F.cross_entropy(logits.reshape(-1, 64), labels.reshape(-1))
    torch.testing.assert_close(m(tokens, labels), expected, rtol=0, atol=0)


def test_init_is_deterministic_in_seed_and_ignores_global_rng():
    torch.manual_seed(1)
    a = build_model(llama_spec(), seed=3).state_dict()
    torch.manual_seed(2)
    b = build_model(llama_spec(), seed=3).state_dict()
    c = build_model(llama_spec(), seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.mixer.q_proj.weight"], c["layers.0.mixer.q_proj.weight"])


def test_tied_head_shares_the_embedding_gradient():
    m = build_model(gpt_spec())
    tokens, labels = batch()
    m(tokens, labels).backward()
    assert m.embed.weight.grad is not None and m.pos_embed.weight.grad.abs().sum() > 0


def test_dtype_and_causality():
    m = build_model(llama_spec(), dtype=torch.float64)
    assert m.layers[0].mixer.q_proj.weight.dtype == torch.float64
    tokens, _ = batch()
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 64
    torch.testing.assert_close(m(tokens)[:, :10], m(changed)[:, :10], rtol=0, atol=0)


@pytest.mark.parametrize("make", [llama_spec, gpt_spec,
                                  lambda: llama_spec(attention=Attention(4, 2, 8, qk_norm=True, rope=Rope()))])
def test_symbolic_trace_gives_identical_loss_and_grads(make):
    gm = traced_and_checked(build_model(make()), batch()[0])
    modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert "layers.0.mixer.q_proj" in modules and "layers.1.mixer.down_proj" in modules
    assert "causal_attention" in call_function_names(gm)


def _shard_linear(linear, rows=None, cols=None):
    w = linear.weight.data
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    linear.weight = torch.nn.Parameter(w.clone())
    if linear.bias is not None and rows is not None:
        linear.bias = torch.nn.Parameter(linear.bias.data[rows].clone())
    elif linear.bias is not None:  # a row-parallel bias is added once, by rank 0
        linear.bias = torch.nn.Parameter(linear.bias.data.clone() * (1.0 if cols.start == 0 else 0.0))


def test_attention_and_mlp_shard_without_rewrites():
    """Sharding q/k/v/gate/up column-wise and o/down row-wise in two halves, then summing the
    partial outputs, reproduces the full block: nothing in forward bakes head counts or widths."""
    m = build_model(llama_spec(attention=Attention(4, 2, 8, qkv_bias=True, qk_norm=True, rope=Rope())))
    x = torch.randn(2, 16, 32)
    for mixer, column, row in ((m.layers[0].mixer, ("q_proj", "k_proj", "v_proj"), "o_proj"),
                               (m.layers[1].mixer, ("gate_proj", "up_proj"), "down_proj")):
        partial = []
        for rank in range(2):
            shard = copy.deepcopy(mixer)
            for name in column:
                out = getattr(shard, name).out_features // 2
                _shard_linear(getattr(shard, name), rows=slice(rank * out, (rank + 1) * out))
            width = getattr(shard, row).in_features // 2
            _shard_linear(getattr(shard, row), cols=slice(rank * width, (rank + 1) * width))
            partial.append(shard(x))
        torch.testing.assert_close(partial[0] + partial[1], mixer(x), rtol=1e-5, atol=1e-6)
