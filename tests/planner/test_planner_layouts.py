"""Layout rules (with their arithmetic), pins, units and enumeration."""
import pytest

from plait.ir.errors import LayoutError
from plait.ir.plan import Layout
from plait.planner.layouts import (check_pins, job_pins, knob_variants, meshes, parse_layout, units,
                                   validate_layout, violations)


def folding(**kw):
    base = dict(tp=2, cp=1, dp=8, pp=8, etp=1, ep=8, edp=2, sp=True)
    base.update(kw)
    return Layout(**base)


def test_paper_folding_layout_is_legal(mixtral_job):
    validate_layout(mixtral_job(), folding())


def test_world_arithmetic(mixtral_job):
    with pytest.raises(LayoutError, match=r"tp\*cp\*dp\*pp = 2\*1\*4\*8 = 64 but the cluster has 128"):
        validate_layout(mixtral_job(), folding(dp=4, edp=1))


def test_heads_divisible_by_tp(mixtral_job):
    msgs = violations(mixtral_job(), folding(tp=16, dp=1, sp=True))
    assert any("kv_heads (8) must be divisible by tp (16): 8 % 16 = 8" in m for m in msgs)


def test_experts_divisible_by_ep(qwen_job):
    lay = Layout(tp=1, dp=64, pp=1, etp=1, ep=3, edp=1)
    assert any("experts (64) must be divisible by ep (3)" in m for m in violations(qwen_job(), lay))


def test_seq_len_by_2cp(mixtral_job):
    msgs = violations(mixtral_job(seq_len=4098), folding(cp=2, dp=4, edp=2))
    assert any("2*cp = 4" in m for m in msgs)


def test_stages_and_batch(mixtral_job):
    msgs = violations(mixtral_job(), folding(vpp=8))
    assert any("56 decoder layers cannot fill pp*vpp = 8*8 = 64" in m for m in msgs)
    msgs = violations(mixtral_job(global_batch=100), folding())
    assert any("global batch (100) must be divisible by dp*mbs = 8*1 = 8" in m for m in msgs)


def test_interleaving_needs_microbatches_divisible_by_pp(mixtral_job):
    # 256 / (8 * 4) = 8 micro-batches, pp 8: fine; mbs 16 -> 2 micro-batches: not divisible by 8
    assert not violations(mixtral_job(), folding(vpp=2, mbs=4))
    assert any("divisible by pp" in m for m in violations(mixtral_job(), folding(vpp=2, mbs=16)))


def test_names(mixtral_job):
    assert "dp_kind" in violations(mixtral_job(), folding(dp_kind="zero7"))[0]


def test_units(mixtral_job, nemotron_job):
    assert units(mixtral_job().model) == (("attention", "moe"),) * 56
    u = units(nemotron_job().model)
    assert len(u) == 52 and u[0] == ("mamba",) and u[1] == ("mlp",)


def test_parse_layout():
    assert parse_layout("tp=2 pp=8 ep=8 etp=1") == {"tp": 2, "pp": 8, "ep": 8, "etp": 1}
    assert parse_layout("dp_shard=fsdp, sp=false recompute=full cp=auto") == {
        "dp_kind": "fsdp", "sp": False, "recompute": "full"}
    with pytest.raises(LayoutError, match="tpp=2"):
        parse_layout("tpp=2")
    with pytest.raises(LayoutError, match="positive integer"):
        parse_layout("tp=two")


def test_impossible_pin_shows_arithmetic(mixtral_job):
    with pytest.raises(LayoutError, match=r"tp\*pp = 3\*2 = 6 does not divide the 128 GPUs"):
        check_pins(mixtral_job(), {"tp": 3, "pp": 2})
    with pytest.raises(LayoutError, match=r"experts \(8\) must be divisible by ep \(16\)"):
        check_pins(mixtral_job(), {"ep": 16})
    check_pins(mixtral_job(), {"tp": 2, "pp": 8, "ep": 8, "etp": 1})


def test_job_pins_restrict_meshes(mixtral_job):
    job = mixtral_job(pins=(("tp", 2), ("pp", 8), ("dp_shard", False)))
    pins = job_pins(job)
    assert pins["dp_kind"] == "zero1"
    found = list(meshes(job, pins))
    assert found and all(m.tp == 2 and m.pp == 8 and m.dp * m.cp == 8 for m in found)
    assert {(m.etp, m.ep) for m in found} >= {(1, 8), (2, 4), (2, 8)}
    for m in found:
        assert m.etp * m.ep * m.edp == 16


def test_enumeration_is_legal_and_complete(qwen_job):
    job = qwen_job()
    all_meshes = list(meshes(job, {}))
    assert len(all_meshes) == len(set(all_meshes))
    for m in all_meshes[:40]:
        for lay in knob_variants(job, m, {}):
            assert not violations(job, lay)
    assert any(m.tp == 2 and m.pp == 4 and m.ep == 4 and m.etp == 1 for m in all_meshes)
    assert all(m.tp <= 8 and m.etp <= 8 for m in all_meshes)


def test_dense_model_meshes_have_no_expert_split(gpt_job):
    job = gpt_job(4096, 32, 36, 128, 512)
    for m in meshes(job, {}):
        assert m.ep == 1 and m.etp == m.tp and m.edp == m.dp * m.cp


def test_context_parallel_ranks_fold_into_expert_parallel(mixtral_job):
    """ep may span CP ranks (ep divides tp*cp*dp, not only dp): cp2 dp4 | ep8 on 8 ranks per stage."""
    job = mixtral_job(gpus=64)
    folded = Layout(tp=1, cp=2, dp=4, pp=8, etp=1, ep=8, edp=1)
    validate_layout(job, folded)
    found = list(meshes(job, {"cp": 2, "pp": 8}))
    assert any(m.ep > m.dp for m in found)
    assert folded in [m for m in found if m.tp == 1 and m.ep == 8 and m.etp == 1]


def test_fsdp_with_folded_experts_is_a_legal_layout(mixtral_job):
    """FSDP shards expert weights over their own EDP group (Megatron-FSDP; the paper's fsdp_ep
    baseline), so the planner offers fsdp with CP / DP folded into EP."""
    job = mixtral_job(gpus=64)
    folded = Layout(tp=1, cp=2, dp=4, pp=8, etp=1, ep=8, edp=1, dp_kind="fsdp")
    assert not violations(job, folded)
    kinds = {v.dp_kind for v in knob_variants(job, Layout(tp=1, cp=2, dp=4, pp=8, etp=1, ep=8, edp=1),
                                              {})}
    assert {"fsdp", "zero1"} <= kinds

def test_the_papers_fsdp_ep_baseline_plans(mixtral_job):
    """MoE Parallel Folding's FSDP+EP8 baseline on 128 H100 (Table 3) is a layout the planner
    can cost: FSDP over 128 ranks with experts sharded over EP8 x EDP16."""
    from plait.planner.search import estimate

    plan = estimate(mixtral_job(gpus=128), {"tp": 1, "cp": 1, "pp": 1, "etp": 1, "ep": 8,
                                            "dp_kind": "fsdp"})
    assert (plan.layout.dp, plan.layout.edp, plan.layout.dp_kind) == (128, 16, "fsdp")
    assert 0 < plan.prediction.mfu < 1
