"""Checkpoints (DCP): what a save holds, exact resumption, clear errors for a missing or
mismatched checkpoint, and `plait run --save/--resume` end to end."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from plait.cli import main
from plait.ir.cluster import local_cpu
from plait.ir.dsl import load_job
from plait.ir.errors import PlaitError
from plait.ir.job import Precision
from plait.ir.model import Attention, ModelSpec, MoE
from plait.ir.plan import Layout
from plait.runtime import checkpoint
from plait.runtime.ckpt_integrity import check_model, read_meta
from plait.runtime.harness import resume_check
from plait.runtime.harness.parity import Case

from ckpt_util import SETUP, SPEC, TINY, single_rank



@pytest.fixture
def one_rank(tmp_path):
    with single_rank(tmp_path):
        yield tmp_path


@pytest.mark.parametrize("dp_kind", ["replicated", "zero1", "fsdp"])
def test_one_rank_resume_equals_the_uninterrupted_run(dp_kind, one_rank):
    case = Case(dp_kind, Layout(dp_kind=dp_kind))
    resume_check.run_resume_case(SETUP, case, 2, 0, one_rank)
    record = torch.load(one_rank / f"{dp_kind}.rank0.pt")
    assert record["start"] == 2 and len(record["resumed"]) == 2
    assert record["resumed"] == record["whole"] and record["params"] == 0.0


@pytest.mark.parametrize("dp_kind", ["replicated", "zero1", "fsdp"])
def test_bf16_resume_keeps_fp32_main_weights_and_adam_state(dp_kind, one_rank):
    """Mixed precision: the fp32 main weights and their AdamW state are part of the checkpoint, so
    a resumed bf16 run continues bit for bit (bf16 weights alone would lose the fp32 digits)."""
    case = Case(dp_kind, Layout(dp_kind=dp_kind))
    resume_check.run_resume_case(replace(SETUP, precision=Precision("bf16")), case, 2, 0, one_rank)
    record = torch.load(one_rank / f"{dp_kind}.rank0.pt")
    assert record["resumed"] == record["whole"] and record["params"] == 0.0


def test_moe_expert_bias_is_part_of_the_state(one_rank):
    """Aux-loss-free balancing moves a persistent buffer every step: a resumed run needs it."""
    spec = ModelSpec(name="ckpt-moe", vocab=64, hidden=32, layers=("attention", "moe"),
                     attention=Attention(heads=2, kv_heads=2, head_dim=16),
                     moe=MoE(experts=4, top_k=2, ffn=16, expert_bias=True))
    setup, case = replace(SETUP, spec=spec), Case("moe", Layout())
    saved = resume_check.build_trainer(setup, case, seed=0)
    saved.train_step(0, setup.steps)
    checkpoint.save(saved, one_rank / "ckpt", 1, setup.steps)
    fresh = resume_check.build_trainer(setup, case, seed=1)
    (name, want), = checkpoint.persistent_buffers(saved).items()
    assert name == "layers.1.mixer.expert_bias" and want.abs().sum() > 0  # it moved
    checkpoint.load(fresh, one_rank / "ckpt")
    assert torch.equal(checkpoint.persistent_buffers(fresh)[name], want)


def _adam(trainer) -> list[torch.Tensor]:
    return [t for state in trainer.dp.optimizer.state.values() for t in state.values()]


def test_load_restores_parameters_optimizer_and_rng_from_another_seed(one_rank):
    case = Case("zero1", Layout())
    saved = resume_check.build_trainer(SETUP, case, seed=0)
    for step in range(2):
        saved.train_step(step, SETUP.steps)
    torch.manual_seed(7)
    where = checkpoint.save(saved, one_rank / "ckpt", 2, SETUP.steps)
    rng = torch.get_rng_state()
    assert where.name == "step-000002" and (one_rank / "ckpt" / "latest").read_text().strip() == where.name
    meta = json.loads((where / "plait.json").read_text())
    assert meta["step"] == 2 and meta["layout"]["dp_kind"] == "zero1" and meta["data"]["next_step"] == 2

    fresh = resume_check.build_trainer(SETUP, case, seed=1)
    before, want = fresh.dp.full_parameters(), saved.dp.full_parameters()
    assert any(not torch.equal(before[n], want[n]) for n in want)
    torch.manual_seed(8)
    assert checkpoint.load(fresh, one_rank / "ckpt") == 2
    got = fresh.dp.full_parameters()
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert all(torch.equal(a, b) for a, b in zip(_adam(fresh), _adam(saved)))
    assert all(torch.equal(a.master, b.master) for a, b in zip(fresh.dp.flats, saved.dp.flats))
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    """A real one-rank checkpoint of SETUP under Layout() (zero1), written once."""
    tmp = tmp_path_factory.mktemp("saved")
    with single_rank(tmp):
        trainer = resume_check.build_trainer(SETUP, Case("zero1", Layout()), seed=0)
        trainer.train_step(0, SETUP.steps)
        checkpoint.save(trainer, tmp / "ckpt", 1, SETUP.steps)
    return tmp / "ckpt"


def test_missing_and_empty_checkpoints_name_their_path(tmp_path):
    with pytest.raises(PlaitError, match=f"no checkpoint at {tmp_path / 'nope'}"):
        checkpoint.find(tmp_path / "nope")
    with pytest.raises(PlaitError, match=f"no checkpoint in {tmp_path}"):
        checkpoint.find(tmp_path)


def test_a_checkpoint_of_another_model_is_refused_naming_the_field(saved_dir):
    where = checkpoint.find(saved_dir)
    meta = read_meta(where)
    check_model(where, meta, SPEC)  # the same model: any layout may load it
    with pytest.raises(PlaitError, match=r"holds model 'ckpt-test', .* at hidden: 32 in the "
                                         r"checkpoint, 64 here"):
        check_model(where, meta, replace(SPEC, hidden=64))
    with pytest.raises(PlaitError, match=r"at attention.kv_heads: 2 in the checkpoint, 4 here"):
        check_model(where, meta, replace(SPEC, attention=replace(SPEC.attention, kv_heads=4)))


def test_cli_resume_from_nothing_exits_2_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "no-such-checkpoint"
    assert main(["run", str(TINY), "--layout", "tp=2 pp=2", "--synthetic", "--steps", "2",
                 "--resume", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err
    assert main(["run", str(TINY), "--layout", "tp=2 pp=2", "--save-every", "2"]) == 2
    assert "--save-every needs --save" in capsys.readouterr().err


@pytest.mark.tier2
def test_four_ranks_resumed_at_step_2_equal_the_uninterrupted_run(tmp_path):
    cases = [Case("pp2_dp2_zero1", Layout(pp=2, dp=2, dp_kind="zero1")),
             Case("tp2_dp2_fsdp_sp", Layout(tp=2, dp=2, dp_kind="fsdp", sp=True))]
    results = resume_check.run_resume(SETUP, cases, k=2, out_dir=str(tmp_path))
    for name, errors in results.items():
        assert errors.resumed_from == 2, name
        assert errors.max == 0.0, (name, errors)  # bit for bit: same ops, same order


@pytest.mark.tier2
def test_plait_run_save_then_resume_continues_the_same_run(tmp_path):
    from plait.runtime.launch import Checkpointing, check_plan, hand_plan, launch_local, resolve_data

    job = load_job(str(TINY))
    job = replace(job, cluster=local_cpu(2), global_batch=4, seq_len=32,
                  data=replace(job.data, synthetic=True, path=None))
    plan = check_plan(job, hand_plan(job, Layout(dp=2, dp_kind="zero1")))
    job = resolve_data(job, tmp_path)
    saves = tmp_path / "ckpt"
    assert launch_local(job, plan, tmp_path / "a", steps=2, quiet=True,
                        ckpt=Checkpointing(save=str(saves), every=1)) == 0
    assert sorted(p.name for p in saves.glob("step-*")) == ["step-000001", "step-000002"]
    assert launch_local(job, plan, tmp_path / "b", steps=2, quiet=True,
                        ckpt=Checkpointing(resume=str(saves / "step-000001"))) == 0
    whole = json.loads((tmp_path / "a" / "log.json").read_text())
    resumed = json.loads((tmp_path / "b" / "log.json").read_text())
    assert [e["step"] for e in resumed] == [1]
    assert resumed[0]["loss"] == whole[1]["loss"]


def test_asynchronous_saves_hold_the_state_of_their_step(one_rank):
    """Written in the background while training goes on, each save still holds its own step."""
    from plait.runtime.ckpt_integrity import verify

    case = Case("zero1", Layout())
    trainer = resume_check.build_trainer(SETUP, case, seed=0)
    saver = checkpoint.Saver(str(one_rank / "async"), every=1, asynchronous=True)
    at = {}
    for step in range(3):
        trainer.train_step(step, SETUP.steps)
        at[step + 1] = trainer.dp.full_parameters()
        assert saver(trainer, step + 1, SETUP.steps) is None  # pending, not finished
    assert saver.close().name == "step-000003"
    for step in (2, 3):
        verify(checkpoint.step_dir(one_rank / "async", step))
        fresh = resume_check.build_trainer(SETUP, case, seed=1)
        assert checkpoint.load(fresh, checkpoint.step_dir(one_rank / "async", step)) == step
        got = fresh.dp.full_parameters()
        assert all(torch.equal(got[n], at[step][n]) for n in got)


@pytest.mark.tier2
def test_plait_run_resumes_a_checkpoint_under_another_plan(tmp_path):
    """Saved by two ZeRO-1 replicas, continued under tensor parallelism: `plait run --resume` no
    longer asks for the writer's layout, and the continued loss is the uninterrupted one."""
    from plait.runtime.launch import Checkpointing, check_plan, hand_plan, launch_local, resolve_data

    job = load_job(str(TINY))
    job = replace(job, cluster=local_cpu(2), global_batch=4, seq_len=32,
                  data=replace(job.data, synthetic=True, path=None))
    job = resolve_data(job, tmp_path)
    saves = tmp_path / "ckpt"
    a = check_plan(job, hand_plan(job, Layout(dp=2, dp_kind="zero1")))
    assert launch_local(job, a, tmp_path / "a", steps=2, quiet=True,
                        ckpt=Checkpointing(save=str(saves), every=1)) == 0
    b = check_plan(job, hand_plan(job, Layout(tp=2, sp=True)))
    assert launch_local(job, b, tmp_path / "b", steps=2, quiet=True,
                        ckpt=Checkpointing(resume=str(saves / "step-000001"))) == 0
    whole = json.loads((tmp_path / "a" / "log.json").read_text())
    resumed = json.loads((tmp_path / "b" / "log.json").read_text())
    assert [e["step"] for e in resumed] == [1]
    assert abs(resumed[0]["loss"] - whole[1]["loss"]) < 1e-5
