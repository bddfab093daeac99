"""The cost model prices multi-head latent attention by its own GEMMs (one source with ir/counts):
FLOPs equal the counts, the latent down-projections stay whole on every TP rank, and the context
parallel exchange carries per-head K and V of MLA's widths (q/k heads 192 wide, v heads 128)."""
from dataclasses import replace
from pathlib import Path

from plait.ir import counts
from plait.ir.dsl import load_model
from plait.ir.plan import Layout
from plait.kinds.attention import cost as attention_cost
from plait.planner.cost.context import Context

DEEPSEEK_V3 = load_model(str(Path(__file__).resolve().parents[2] / "specs" / "models" / "deepseek-v3.plait"))


def context(mixtral_job, layout: Layout) -> Context:
    return Context(replace(mixtral_job(gpus=64), model=DEEPSEEK_V3, seq_len=4096), layout)


def test_attention_flops_are_the_counted_ones_and_down_projections_do_not_shrink_with_tp(mixtral_job):
    one, eight = context(mixtral_job, Layout(tp=1, dp=64)), context(mixtral_job, Layout(tp=8, dp=8))
    per_token = counts.attention_flops(DEEPSEEK_V3, 4096)
    assert attention_cost.work(one).flops == one.tokens * per_token
    a, h = DEEPSEEK_V3.attention, DEEPSEEK_V3.hidden
    down = 2 * h * (1536 + 512 + 64)  # q_a and kv_a: replicated on each TP rank
    assert attention_cost.work(eight).flops == eight.tokens * ((per_token - down) / 8 + down)
    # MLA is not GQA with the same heads: different projections and a narrower v in the core
    gqa = replace(a, latent=None, kv_heads=128, head_dim=192)
    assert counts.attention_gemm_weights(gqa, h) != counts.attention_gemm_weights(a, h)


def test_context_parallel_exchanges_mla_k_and_v_widths(mixtral_job):
    ring = context(mixtral_job, Layout(tp=8, cp=2, dp=4))
    a = DEEPSEEK_V3.attention
    assert (a.kv_dim, a.v_dim, a.out_dim) == (128 * 192, 128 * 128, 128 * 128)
    as_gqa = Context(replace(ring.job, model=replace(DEEPSEEK_V3, attention=replace(
        a, latent=None, head_dim=192))), ring.layout)  # v heads as wide as q/k heads
    assert attention_cost.cp_comm(ring) < attention_cost.cp_comm(as_gqa)


def test_pruning_an_mla_model_is_refused_in_words():
    import pytest

    from plait.ir.errors import PlaitError
    from plait.planner.prune.options import pruned_spec
    with pytest.raises(PlaitError, match="pruning multi-head latent attention"):
        pruned_spec(DEEPSEEK_V3, DEEPSEEK_V3.hidden, {"attention_heads": 64}, DEEPSEEK_V3.layers)
