"""Resharding: a checkpoint written under plan A resumes under plan B of the same model and job,
and the resumed run's losses follow the uninterrupted run under A step by step (fp32, 1e-5).
Covers TP, SP, PP, VPP, DP replicated / ZeRO-1 / FSDP, CP, EP and ETP on both sides of a move,
dense, MoE (with its expert-bias buffers) and hybrid Mamba models. One spawn per world size."""
from dataclasses import replace

import pytest

from plait.ir.dsl import load_model
from plait.ir.model import MLP, Attention, ModelSpec, Rope
from plait.ir.plan import Layout
from plait.runtime.harness.parity import Case, Setup
from plait.runtime.harness.resume_check import Move, run_moves

DENSE = ModelSpec(name="reshard", vocab=64, hidden=32, layers=("attention", "mlp") * 2,
                  attention=Attention(heads=4, kv_heads=2, head_dim=8, rope=Rope()),
                  mlp=MLP(ffn=48))
MOE = load_model("specs/models/tiny-moe.plait")
MOE = replace(MOE, moe=replace(MOE.moe, expert_bias=True))  # a buffer that must move too
HYBRID = load_model("specs/models/tiny-hybrid.plait")
HYBRID = replace(HYBRID, attention=replace(HYBRID.attention, rope=Rope(theta=10000.0)))
STEPS, SAVED_AT = 3, 1
D = Setup(DENSE, global_batch=4, seq=8, steps=STEPS)


def move(name: str, a: Layout, b: Layout, setup: Setup = D, a_schedule: str = "1f1b") -> Move:
    return Move(name, Case(f"{name} A", a, schedule=a_schedule), Case(f"{name} B", b), setup)


MOVES = [
    move("tp2 -> dp2", Layout(tp=2, dp_kind="replicated"), Layout(dp=2, dp_kind="replicated")),
    move("dp2 zero1 -> tp2 sp", Layout(dp=2, dp_kind="zero1"), Layout(tp=2, sp=True)),
    move("pp2 vpp2 -> pp2", Layout(pp=2, vpp=2), Layout(pp=2), a_schedule="interleaved"),
    move("cp2 -> tp2", Layout(cp=2), Layout(tp=2)),
    move("tp2 -> pp2 (tiny-hybrid)", Layout(tp=2), Layout(pp=2),
         Setup(HYBRID, global_batch=4, seq=32, steps=STEPS)),
    move("tp2 pp2 -> dp4 fsdp", Layout(tp=2, pp=2), Layout(dp=4, dp_kind="fsdp")),
    move("ep4 -> ep2 etp2 (tiny-moe)", Layout(dp=4, ep=4), Layout(dp=4, ep=2, etp=2),
         Setup(MOE, global_batch=4, seq=16, steps=STEPS)),
    # the shared expert is a TP shard under TP (Megatron-Core's SharedExpertMLP), whole without it
    move("dp2 fsdp -> tp2 sp ep2 (tiny-moe shared expert tp1 -> tp2)", Layout(dp=2, edp=2, dp_kind="fsdp"),
         Layout(tp=2, sp=True, ep=2), Setup(MOE, global_batch=4, seq=16, steps=STEPS)),
    move("tp2 sp etp2 -> dp2 (tiny-moe shared expert tp2 -> tp1)", Layout(tp=2, sp=True, etp=2),
         Layout(dp=2, edp=2), Setup(MOE, global_batch=4, seq=16, steps=STEPS)),
]


@pytest.mark.tier2
def test_a_run_resumed_under_another_plan_follows_the_uninterrupted_run(tmp_path):
    results = run_moves(MOVES, SAVED_AT, str(tmp_path))
    print({name: f"{e.losses:.1e}" for name, e in results.items()})  # measured (pytest -s)
    assert set(results) == {m.name for m in MOVES}
    for name, errors in results.items():
        assert errors.resumed_from == SAVED_AT, name
        assert errors.losses < 1e-5, (name, errors)
        assert errors.replaced > 0.9, (name, errors)  # B's own init was overwritten by the load
