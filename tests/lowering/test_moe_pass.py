"""Tier 1: the dispatch_experts pass on shapes, shards, gradient records and program text, and a
one-rank compiled MoE program against the reference model (no processes)."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from plait.ir import legality
from plait.ir.errors import LayoutError
from plait.ir.job import MoEOptions
from plait.ir.model import MLP, Attention, ModelSpec, MoE, Rope
from plait.ir.plan import Layout, ParallelPlan, even_stages
from plait.lowering.build import build_model
from plait.lowering.compile import lower, program_text
from plait.lowering.moe import ExpertParallelMoE, shard_experts

torch.set_num_threads(1)

SPEC = ModelSpec(
    name="moe-pass-test", vocab=128, hidden=32, layers=("attention", "mlp") + ("attention", "moe") * 2,
    attention=Attention(heads=4, kv_heads=2, head_dim=8, rope=Rope()), mlp=MLP(ffn=48),
    moe=MoE(experts=8, top_k=2, ffn=16, shared_ffn=24, shared_gate=True, aux_loss=0.01, z_loss=0.001))
SEQ = 8
MOE_LAYERS = (3, 5)


def plan(layout: Layout, moe=None, global_batch=None) -> ParallelPlan:
    return ParallelPlan(job="t", model=SPEC.name, cluster="local-cpu", world=layout.world, layout=layout,
                        stages=even_stages(SPEC.num_layers, layout.pp, layout.vpp),
                        global_batch=global_batch or layout.dp * layout.mbs, seq_len=SEQ, moe=moe)


def lowered(layout: Layout, rank: int, moe=None):
    return lower(build_model(SPEC, seed=0), SPEC, plan(layout, moe), rank)


def mixer(program, layer: int) -> ExpertParallelMoE:
    for _, stage in program.local_modules():
        try:
            return stage.get_submodule(f"layers.{layer}.mixer")
        except AttributeError:
            continue
    raise KeyError(layer)


@pytest.mark.parametrize("rank", [0, 1])
def test_ep2_rank_holds_its_experts_of_the_reference(rank):
    full = build_model(SPEC, seed=0)
    program = lowered(Layout(dp=2, ep=2, edp=1), rank)
    for layer in MOE_LAYERS:
        m = mixer(program, layer)
        assert isinstance(m, ExpertParallelMoE) and m.grid.ep_rank == rank
        ref = full.layers[layer].mixer
        torch.testing.assert_close(m.experts.w_gate_up, ref.experts.w_gate_up[4 * rank:4 * rank + 4])
        torch.testing.assert_close(m.router.weight, ref.router.weight)
    sync = program.experts
    assert set(sync.params) == {f"layers.{i}.mixer.experts.{w}" for i in MOE_LAYERS for w in ("w_gate_up", "w_down")}
    assert (sync.edp, sync.dp_cp, sync.scale) == (1, 2, 0.5)


def test_etp_slices_gate_and_up_alike_and_folds_onto_dense_ranks():
    full = build_model(SPEC, seed=0).layers[3].mixer.experts
    # world 4: dense tp2 x dp2 with sequence parallelism, experts etp2 x ep2
    program = lowered(Layout(tp=2, sp=True, dp=2, ep=2, etp=2, edp=1), rank=3)
    m = mixer(program, 3)
    assert (m.grid.ep_rank, m.grid.etp_rank) == (1, 1)
    up, down = shard_experts(full.w_gate_up, full.w_down, m.grid, gated=True)
    assert m.experts.w_gate_up.shape == (4, 16, 32) and m.experts.w_down.shape == (4, 32, 8)
    torch.testing.assert_close(m.experts.w_gate_up, up)
    torch.testing.assert_close(m.experts.w_down, down)
    assert (m.token_axes, m.token_parts, m.averaged_parts) == (("tp",), 2, 1)


@pytest.mark.parametrize("layout, rank, axes, ep_rank", [
    (Layout(cp=2, ep=2, edp=1), 1, ("cp",), 1),  # CP ranks are the EP ranks
    (Layout(tp=2, sp=True, cp=2, ep=4, edp=1), 2, ("tp", "cp"), 2),  # TP x CP folded into EP
])
def test_context_parallel_ranks_fold_into_expert_parallel(layout, rank, axes, ep_rank):
    """Each rank routes its zigzag chunks; the aux loss counts over TP x CP with a share scaled by
    cp (dense gradients average over DP x CP); expert gradients scale by 1 / (dp * cp)."""
    program = lowered(layout, rank)
    m = mixer(program, 3)
    assert m.grid.ep_rank == ep_rank and m.experts.w_gate_up.shape[0] == 8 // layout.ep
    assert (m.token_axes, m.token_parts, m.averaged_parts) == (axes, layout.tp * 2, 2)
    assert (program.experts.edp, program.experts.dp_cp) == (1, 2)


def test_router_and_gate_sum_over_tp_experts_never_do_and_the_shared_expert_is_a_tp_shard():
    """Megatron-Core's split: the router and the shared expert's gate are replicated over TP (each
    rank's share of their gradient is summed over TP), the shared expert is column / row parallel
    like a dense MLP (a TP shard: no TP sum), routed experts are EP x ETP shards."""
    full = build_model(SPEC, seed=0)
    for rank in (0, 1):
        program = lowered(Layout(tp=2, sp=True, ep=2), rank=rank)
        tp_sum, shards = set(program.grad_sync.tp_sum), program.shards
        params = program.local_parameters()
        for layer in MOE_LAYERS:
            path = f"layers.{layer}.mixer"
            assert {f"{path}.router.weight", f"{path}.shared_gate.weight"} <= tp_sum
            assert not any(n.startswith(f"{path}.experts") or n.startswith(f"{path}.shared.")
                           for n in tp_sum)
            ref = full.layers[layer].mixer.shared
            for leaf, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                name = f"{path}.shared.{leaf}.weight"
                assert (shards[name].dim, shards[name].parts, shards[name].index) == (dim, 2, rank)
                want = getattr(ref, leaf).weight.chunk(2, dim)[rank]
                torch.testing.assert_close(params[name], want)
            assert mixer(program, layer).shared_tp == ("tp", 2)


def test_shared_ffn_must_divide_by_tp():
    spec = replace(SPEC, moe=replace(SPEC.moe, shared_ffn=21))
    with pytest.raises(LayoutError, match=r"shared expert ffn \(21\) must be divisible by tp \(2\): "
                                          r"21 % 2 = 1"):
        lower(build_model(spec, seed=0), spec, plan(Layout(tp=2, etp=2, sp=True)), 0)


def test_program_text_calls_the_expert_parallel_mixer():
    program = lowered(Layout(dp=2, ep=2), rank=1)
    text = "".join(program_text(program).values())
    assert 'getattr(self.layers, "3").mixer(' in text and "route" not in text
    assert "expert tensors (ep 1/2, etp 0/1)" in program.experts.describe()


@pytest.mark.parametrize("layout, message", [
    (Layout(tp=2, ep=2), "need sequence parallelism"),
    (Layout(dp=3, ep=3), r"experts \(8\) must be divisible by ep \(3\): 8 % 3 = 2"),
    (Layout(dp=3, etp=3), r"expert ffn \(16\) must be divisible by etp \(3\): 16 % 3 = 1"),
])
def test_bad_expert_layouts_are_rejected_with_the_arithmetic(layout, message):
    with pytest.raises(LayoutError, match=message):
        lowered(layout, rank=0)


@pytest.mark.parametrize("moe", [None, MoEOptions(capacity_factor=0.5, drop_policy="position")])
def test_one_rank_program_equals_the_reference(moe):
    ref = build_model(SPEC, seed=0, moe_options=moe)
    program = lowered(Layout(), rank=0, moe=moe)
    tokens = torch.randint(0, SPEC.vocab, (2, SEQ), generator=torch.Generator().manual_seed(3))
    labels = torch.roll(tokens, -1, 1)
    want = ref(tokens, labels)
    want.backward()
    got = program.pipe(tokens, labels)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    params = program.local_parameters()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(params[name].grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_meta_device_lowering_shards_without_storage():
    with torch.device("meta"):
        model = build_model(SPEC, device="meta", seed=0)
    m = mixer(lower(model, SPEC, plan(Layout(dp=2, ep=2)), 1), 3)
    assert m.experts.w_gate_up.is_meta and m.experts.w_gate_up.shape == (4, 32, 32)


def test_launch_rejects_a_bad_expert_layout_before_any_process_starts():
    from plait.ir.cluster import local_cpu
    from plait.ir.job import TrainJob
    from plait.runtime.launch import check_plan, hand_plan

    job = TrainJob(name="t", model=SPEC, cluster=local_cpu(2), global_batch=4, seq_len=SEQ,
                   moe=MoEOptions(capacity_factor=1.0))
    with pytest.raises(LayoutError, match="sequence parallelism"):
        check_plan(job, plan(Layout(tp=2, ep=2)))
    assert hand_plan(job, Layout(dp=2, ep=2)).moe == job.moe  # capacity reaches the program


def test_runtime_refuses_fsdp_unless_experts_replicate_over_dp_cp_with_the_arithmetic():
    from plait.ir.dsl import load_model

    spec = load_model(str(Path(__file__).resolve().parents[2] / "specs" / "models" / "tiny-moe.plait"))

    def check_expert_layout(spec, lay):  # the rows the dispatch_experts pass asks
        legality.require(legality.Workload(spec, 64, lay.dp, lay.world), lay, ("experts",))

    folded = Layout(tp=1, cp=2, dp=4, pp=1, etp=1, ep=2, edp=4, dp_kind="fsdp")
    with pytest.raises(LayoutError, match=r"edp = 4, dp\*cp = 4\*2 = 8"):
        check_expert_layout(spec, folded)
    check_expert_layout(spec, Layout(tp=1, cp=2, dp=4, pp=1, etp=1, ep=2, edp=4, dp_kind="zero1"))
    check_expert_layout(spec, Layout(tp=2, cp=1, dp=2, pp=1, etp=1, ep=2, edp=2, sp=True,
                                     dp_kind="fsdp"))  # etp*ep = tp: edp = dp*cp
