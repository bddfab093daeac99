"""FLOPs per token: hand-computed tiny models, Megatron-Core's formulas, and the SC'21 formulas."""
from pathlib import Path

import pytest
from sc21_gpt import gpt, sc21_rows  # tests/ir/sc21_gpt.py

from plait.ir import counts
from plait.ir.errors import PlaitError
from plait.ir.hf import model_from_hf_file
from plait.ir.model import MLP, Attention, Mamba2, ModelSpec, MoE

SPECS = Path(__file__).resolve().parents[2] / "specs"


def tiny(**overrides) -> ModelSpec:
    fields = dict(name="tiny", vocab=32, hidden=8, layers=("attention", "mlp"),
                  attention=Attention(heads=2, kv_heads=1, head_dim=4), mlp=MLP(ffn=16))
    fields.update(overrides)
    return ModelSpec(**fields)


def test_tiny_dense_by_hand():
    m, s = tiny(), 10
    # q (8->8) + k, v (8->4 each) + o (8->8): 2 * (64 + 32 + 32 + 64) = 384
    # QK^T and scores x V over q_dim 8: full 2 * 2 * 8 * 10 = 320, causal half = 160
    assert counts.layer_flops(m, "attention", s) == 384 + 160
    assert counts.layer_flops(m, "attention", s, causal=False) == 384 + 320
    assert counts.layer_flops(m, "mlp", s) == 2 * 3 * 8 * 16 == 768  # gate, up, down
    assert counts.logits_flops(m) == 2 * 8 * 32 == 512
    assert counts.flops_per_token(m, s, training=False) == 544 + 768 + 512 == 1824
    assert counts.flops_per_token(m, s) == 3 * 1824
    # full recompute re-runs the layers' forward, not the logits
    assert counts.flops_per_token(m, s, recompute="full") == 3 * 1824 + 544 + 768
    assert counts.flops_per_token(m, s, recompute="selective") == 3 * 1824 + 160


def test_moe_counts_top_k_shared_and_router():
    moe = MoE(experts=4, top_k=2, ffn=6, shared_ffn=10, shared_gate=True)
    m = tiny(layers=("attention", "moe"), mlp=None, moe=moe)
    # routed 2 * 6 + shared 10, three GEMMs each: 2 * 8 * 22 * 3 = 1056; router 2*8*4 + gate 2*8
    assert counts.layer_flops(m, "moe", 10) == 1056 + 64 + 16
    relu2 = tiny(layers=("moe",), attention=None, mlp=None,
                 moe=MoE(experts=4, top_k=1, ffn=6, activation="relu2", router="sigmoid"))
    assert counts.layer_flops(relu2, "moe", 10) == 2 * 8 * 6 * 2 + 2 * 8 * 4


def test_mamba_by_hand():
    m = tiny(layers=("mamba",), attention=None, mlp=None,
             mamba=Mamba2(heads=4, head_dim=4, groups=2, state=3))
    d_inner = 16
    in_proj = 2 * 8 * (2 * d_inner + 2 * 2 * 3 + 4)
    assert counts.layer_flops(m, "mamba", 99) == in_proj + 7 * d_inner * 3 + 2 * d_inner * 8


def test_per_layer_flops_sum_to_total():
    m = model_from_hf_file(str(SPECS / "hf" / "nemotron-h-8b.json"))
    per_layer = counts.per_layer_flops(m, 8192)
    assert len(per_layer) == m.num_layers
    assert sum(per_layer) + counts.logits_flops(m) == pytest.approx(
        counts.flops_per_token(m, 8192, training=False), rel=1e-15)


def _band_keys(s: int, w: int) -> int:
    """Keys visible to all queries of a causal window w, counted one by one: min(i + 1, w)."""
    return sum(min(i + 1, w) for i in range(s))


def test_sliding_window_counts_the_band_of_the_score_square():
    m, s = tiny(layers=("attention", "mlp") * 3), 64
    full = counts.attention_core_flops(m, s)
    assert full == 2 * 2 * 8 * s / 2  # Megatron's causal s / 2 keys per query
    for w in (1, 8, 16, 63):
        windowed = tiny(layers=m.layers, attention=Attention(heads=2, kv_heads=1, head_dim=4, window=w))
        band = counts.attention_core_flops(windowed, s)
        assert band == 2 * 2 * 8 * (w - w * w / (2 * s))  # area s*w - w^2/2 over s
        # the continuous area is the exact count up to the half-diagonal both conventions drop
        assert abs(band / 32 * s - _band_keys(s, w)) <= s / 2
        assert counts.attention_core_flops(windowed, s, causal=False) == 2 * 2 * 8 * w
    for w in (64, 65, 10 ** 6):  # a window no shorter than the sequence is full causal attention
        same = tiny(layers=m.layers, attention=Attention(heads=2, kv_heads=1, head_dim=4, window=w))
        assert counts.attention_core_flops(same, s) == full
    # ~ s * w for w << s: 4096 of 128K costs 1/16 of causal attention, minus the w^2/2 corner
    assert counts.attended_keys(131072, 4096) / counts.attended_keys(131072) == pytest.approx(1 / 16, rel=0.04)


def test_per_layer_windows_count_per_layer_and_average_over_attention():
    attn = Attention(heads=2, kv_heads=1, head_dim=4, window=8, full_layers=(0,))
    m, s = tiny(layers=("attention", "mlp") * 3, attention=attn), 64
    per_layer = counts.per_layer_flops(m, s)
    core_full, core_band = 2 * 2 * 8 * 32, 2 * 2 * 8 * (8 - 64 / 128)
    assert per_layer[0] - per_layer[2] == core_full - core_band and per_layer[2] == per_layer[4]
    assert counts.attention_core_flops(m, s) == (core_full + 2 * core_band) / 3
    assert sum(per_layer) + counts.logits_flops(m) == counts.forward_flops_per_token(m, s)
    assert counts.flops_per_token(m, s, recompute="selective") - counts.flops_per_token(m, s) == \
        core_full + 2 * core_band


@pytest.mark.parametrize("cp, seq, window, steps", [
    (4, 64, None, (0, 1, 2, 3)),
    (4, 64, 9, (0, 1, 3)),  # chunks of 8: a window of 9 reaches one chunk back
    (8, 128 * 1024, 4096, (0, 1, 7)),  # Mistral's window at 128K on cp 8: 2 exchanges, not 7
    (8, 64, 100, tuple(range(8))),  # a window past the sequence skips nothing
    (2, 32, 2, (0, 1)),  # cp 2: the neighbours are always adjacent chunks
])
def test_ring_steps_are_those_with_a_visible_chunk_pair(cp, seq, window, steps):
    assert counts.ring_steps(cp, seq, window) == steps
    attn = Attention(heads=2, kv_heads=1, head_dim=4, window=window)
    assert counts.ring_exchanges(tiny(attention=attn), cp, seq) == len(steps) - 1


def test_unknown_recompute_is_an_error():
    with pytest.raises(PlaitError, match="recompute"):
        counts.flops_per_token(tiny(), 8, recompute="some")


# Megatron-Core's num_floating_point_operations, restated term by term for an independent check.

def megatron_transformer(m: ModelSpec, s: int) -> float:
    """Training FLOPs per token of transformer_flops() (3 passes, causal attention)."""
    a, h = m.attention, m.hidden
    attn = h * (a.q_dim + 2 * a.kv_dim) + a.q_dim * s / 2 * 2 + a.q_dim * h
    mlp_terms = 0.0
    if m.mlp is not None:
        mlp_terms += m.count("mlp") * m.mlp.ffn * (3 if m.mlp.gated else 2)
    if m.moe is not None:
        width = m.moe.ffn * m.moe.top_k + m.moe.shared_ffn
        mlp_terms += m.count("moe") * width * (3 if m.moe.gated else 2)
    return 3 * 2 * (h * mlp_terms + m.count("attention") * attn + h * m.vocab)


def megatron_hybrid(m: ModelSpec, s: int) -> float:
    """Training FLOPs per token of hybrid_flops() (Mamba d_in = 2 * hidden, as Megatron has it)."""
    h, a, mb = m.hidden, m.attention, m.mamba
    attn = 4 * h * (a.q_dim / h) * (h + h * a.kv_heads / a.heads + s / 2)
    mlp = 4 * (m.mlp.ffn / h) * h * h
    d_in = 2 * h
    mamba = 2 * h * (2 * d_in + 2 * mb.groups * mb.state + mb.heads) + 7 * d_in * mb.state \
        + 2 * d_in * h
    fwd = m.count("attention") * attn + m.count("mlp") * mlp + m.count("mamba") * mamba \
        + 2 * h * m.vocab
    return 3 * fwd


@pytest.mark.parametrize("name", ["llama-3.1-8b", "llama-3.1-405b", "qwen3-30b-a3b"])
def test_transformer_models_match_megatron(name):
    m = model_from_hf_file(str(SPECS / "hf" / f"{name}.json"))
    routers = m.count("moe") * counts.router_flops(m) * 3 if m.is_moe else 0.0
    ours = counts.flops_per_token(m, 8192)
    # plait also counts the router GEMMs, which Megatron's formula leaves out
    assert ours - routers == pytest.approx(megatron_transformer(m, 8192), rel=1e-12)
    assert routers < 5e-3 * ours


@pytest.mark.parametrize("name", ["nemotron-h-8b", "nemotron-h-56b"])
def test_hybrid_models_match_megatron(name):
    m = model_from_hf_file(str(SPECS / "hf" / f"{name}.json"))
    assert counts.flops_per_token(m, 8192) == pytest.approx(megatron_hybrid(m, 8192), rel=1e-12)


def test_nemotron_h_4b_uses_its_real_mamba_width():
    # 112 heads * 64 = 7168 != 2 * 3072: Megatron's formula would assume 6144.
    m = model_from_hf_file(str(SPECS / "hf" / "nemotron-h-4b.json"))
    assert counts.flops_per_token(m, 8192) > megatron_hybrid(m, 8192)


@pytest.mark.parametrize("row", sc21_rows(), ids=lambda r: r["params_billion"])
def test_gpt_family_against_sc21_formulas(row):
    """SC'21 counts the full s x s attention square. Per iteration (B sequences of s tokens):
    72 B s l h^2 (1 + s/6h + V/12lh) = 3 passes (no recompute); the paper's Table 1 uses
    96 B s l h^2 (1 + s/6h + V/16lh) = 4 passes of the layers (full recompute) + 3 of the logits.
    plait's Megatron-Core convention is causal: it drops half the s^2 term, 6 B s^2 l h of the 72."""
    h, l, heads = int(row["hidden"]), int(row["layers"]), int(row["heads"])
    B, s, V = int(row["global_batch"]), 2048, 51200
    m = gpt(h, l, heads)
    f72 = 72 * B * s * l * h**2 * (1 + s / (6 * h) + V / (12 * l * h))
    f96 = 96 * B * s * l * h**2 * (1 + s / (6 * h) + V / (16 * l * h))
    assert B * s * counts.flops_per_token(m, s, causal=False) == pytest.approx(f72, rel=1e-12)
    assert B * s * counts.flops_per_token(m, s, recompute="full", causal=False) == pytest.approx(
        f96, rel=1e-12)
    assert B * s * counts.flops_per_token(m, s) == pytest.approx(
        f72 - 6 * B * s * s * l * h, rel=1e-12)


def test_latent_attention_by_hand():
    from plait.ir.model import LatentKV, Rope
    lat = LatentKV(kv_lora_rank=6, qk_nope_head_dim=3, qk_rope_head_dim=2, v_head_dim=4, q_lora_rank=5)
    m = tiny(attention=Attention(heads=2, kv_heads=2, head_dim=5, rope=Rope(), latent=lat))
    # q_a 8x5 + q_b 5x(2*5) + kv_a 8x(6+2) + kv_b 6x(2*(3+4)) + o (2*4)x8 = 40+50+64+84+64 = 302
    # core: QK^T over 2 heads x 5 dims, PV over 2 heads x 4 dims: 2*(10+8)*10 full, half causal = 180
    assert counts.layer_flops(m, "attention", 10) == 2 * 302 + 180
    assert counts.layer_flops(m, "attention", 10, causal=False) == 2 * 302 + 360
    no_q_lora = tiny(attention=Attention(heads=2, kv_heads=2, head_dim=5, rope=Rope(),
                                         latent=LatentKV(6, 3, 2, 4)))
    assert counts.layer_flops(no_q_lora, "attention", 10) == 2 * (302 - 90 + 8 * 10) + 180
