"""Multi-head latent attention and YaRN's mscale pair in the DSL: resolution, located errors, and
parse(format(x)) == x."""
import pytest

from plait.ir.dsl import parse_text
from plait.ir.dsl.fmt import format_model
from plait.ir.errors import SpecError
from plait.ir.model import LatentKV

MLA = '''model "m" {
  vocab = 256
  hidden = 64
  attention { heads = 4, rope = rope(theta = 1e4, scaling = yarn(factor = 40, original_max_positions = 64,
              mscale = 0.7, mscale_all_dim = 1))
              latent = mla(kv_lora_rank = 32, qk_nope_head_dim = 16, qk_rope_head_dim = 8, v_head_dim = 12,
                           q_lora_rank = 48) }
  moe { experts = 8, top_k = 2, ffn = 32, router = sigmoid, groups = 4, topk_groups = 2, group_top = 2 }
  layers = 2 * [attention, moe]
}
'''


def model(text=MLA):
    return parse_text(text).models["m"]


def test_mla_resolves_with_derived_heads_and_head_dim():
    a = model().attention
    assert a.latent == LatentKV(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                                q_lora_rank=48, rope_interleave=True)
    assert (a.kv_heads, a.head_dim, a.v_head_dim, a.rope_dim) == (4, 24, 12, 8)
    assert (a.rope.scaling.mscale, a.rope.scaling.mscale_all_dim) == (0.7, 1.0)
    assert model().moe.group_score_top == 2


@pytest.mark.parametrize("text", [
    MLA,
    MLA.replace("q_lora_rank = 48", "rope_interleave = false"),  # no q LoRA (DeepSeek-V2-Lite)
    MLA.replace(", mscale = 0.7, mscale_all_dim = 1", ""),
])
def test_mla_round_trips_through_fmt(text):
    m = model(text)
    assert parse_text(format_model(m)).models["m"] == m


@pytest.mark.parametrize("old, new, message, line, col", [
    ("heads = 4,", "heads = 4, kv_heads = 2,", "kv_heads (2) != heads (4)", 4, 37),
    ("heads = 4,", "heads = 4, head_dim = 16,", "head_dim (16) must be qk_nope_head_dim + qk_rope_head_dim", 4, 37),
    ("qk_rope_head_dim = 8", "qk_rope_head_dim = 7", "qk_rope_head_dim (7) must be even", 6, 89),
    ("heads = 4,", "heads = 4, qk_norm = true,", "qk_norm is not an option of multi-head latent", 4, 36),
    ("v_head_dim = 12", "v_dim = 12", "unknown key 'v_dim'", 6, 92),
    ("group_top = 2", "group_top = 3", "a group's score sums its best 3 experts, but a group has 2", 8, 102),
])
def test_mla_errors_are_located(old, new, message, line, col):
    with pytest.raises(SpecError) as info:
        parse_text(MLA.replace(old, new))
    e = info.value
    assert message in e.message, e.format()
    assert (e.line, e.col) == (line, col), e.format()


def test_mla_needs_rope():
    text = MLA.replace("rope = rope(theta = 1e4, scaling = yarn(factor = 40, original_max_positions = 64,\n"
                       "              mscale = 0.7, mscale_all_dim = 1))", "rope = none")
    with pytest.raises(SpecError, match="needs rope"):
        parse_text(text)
