"""Trusting a checkpoint: atomic step directories with a manifest written last, verification that
names a missing, truncated, altered or foreign file, job changes refused by field, pickled
metadata never loaded (nothing in it runs), non-finite steps stopping the run."""
import json
import os
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from plait.cli import main
from plait.ir.errors import PlaitError
from plait.ir.plan import Layout
from plait.runtime import checkpoint
from plait.runtime.harness import resume_check
from plait.runtime.ckpt_integrity import MANIFEST, check_job, read_meta, verify
from plait.runtime.harness.parity import Case
from plait.runtime.train import NonFiniteStep

from ckpt_util import SETUP, SPEC, TINY, single_rank



@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two one-rank checkpoints of SETUP (steps 1 and 2) and one of another seed (step 1)."""
    tmp = tmp_path_factory.mktemp("trust")
    with single_rank(tmp):
        trainer = resume_check.build_trainer(SETUP, Case("z", Layout()), seed=0)
        for step in range(2):
            trainer.train_step(step, SETUP.steps)
            checkpoint.save(trainer, tmp / "ckpt", step + 1, SETUP.steps)
        other = resume_check.build_trainer(SETUP, Case("z", Layout()), seed=5)
        other.train_step(0, SETUP.steps)
        checkpoint.save(other, tmp / "other", 1, SETUP.steps)
    return tmp


def _copy(saved: Path, tmp: Path) -> Path:
    shutil.copytree(saved / "ckpt" / "step-000001", tmp / "step-000001")
    return tmp / "step-000001"


def test_a_step_directory_is_complete_and_listed_in_its_manifest(saved):
    root = saved / "ckpt"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001", "step-000002"]
    assert (root / "latest").read_text().strip() == "step-000002"  # moved after the rename
    step = root / "step-000002"
    manifest = verify(step)
    assert set(manifest["files"]) == {p.name for p in step.iterdir()} - {MANIFEST}
    assert set(manifest["fingerprints"]) == {"model", "job", "plan"}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())


@pytest.mark.parametrize("damage, message", [
    ("missing", "rank-00000.safetensors is missing"),
    ("truncated", r"rank-00000.safetensors is truncated \(\d+ bytes, the manifest says \d+\)"),
    ("altered", r"rank-00000.safetensors was altered"),
    ("foreign", r"\.metadata is not in its manifest \(a foreign file\)"),
    ("mixed", r"rank-00000.safetensors was altered"),  # a shard of another run
])
def test_verify_refuses_a_damaged_checkpoint_naming_the_file(saved, tmp_path, damage, message):
    step = _copy(saved, tmp_path)
    shard = step / "rank-00000.safetensors"
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "altered":  # one byte flipped in the data, same size
        data = bytearray(shard.read_bytes())
        data[-5] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "foreign":
        (step / ".metadata").write_bytes(b"x")
    else:
        shutil.copy(saved / "other" / "step-000001" / shard.name, shard)
    with pytest.raises(PlaitError, match=message):
        verify(step)


def test_saving_a_step_again_replaces_the_directory_whole(saved, tmp_path):
    with single_rank(tmp_path):
        root = tmp_path / "ckpt"
        shutil.copytree(saved / "ckpt", root)
        (root / "step-000001" / "stale").write_text("from an older run")
        trainer = resume_check.build_trainer(SETUP, Case("z", Layout()), seed=3)
        checkpoint.save(trainer, root, 1, SETUP.steps)
    assert not (root / "step-000001" / "stale").exists()  # a new directory, not written over
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001", "step-000002"]
    verify(root / "step-000001")


def test_job_changes_that_alter_the_math_are_refused_by_field(saved):
    step = saved / "ckpt" / "step-000001"
    meta = read_meta(step)
    job = SETUP.job(1)
    check_job(step, meta, job, SETUP.steps, allow_change=False)
    for changed, field in [(replace(job, seq_len=16), "seq_len: 8 in the checkpoint, 16 here"),
                           (replace(job, global_batch=8), "global_batch: 4 in the checkpoint, 8"),
                           (replace(job, data=replace(job.data, seed=9)), "data_seed"),
                           (replace(job, optimizer=replace(job.optimizer, lr=1.0)), "optimizer.lr")]:
        with pytest.raises(PlaitError, match=field):
            check_job(step, meta, changed, SETUP.steps, allow_change=False)
        check_job(step, meta, changed, SETUP.steps, allow_change=True)
    with pytest.raises(PlaitError, match="steps: 4 in the checkpoint, 6 here"):
        check_job(step, meta, job, 6, allow_change=False)


class _Payload:
    """What an attacker pickles: unpickling it would create MARKER."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _crafted(where: Path, marker: Path) -> Path:
    where.mkdir()
    (where / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    (where / "__0_0.distcp").write_bytes(pickle.dumps(_Payload(str(marker))))
    return where


def _resume(path: Path) -> list[str]:
    return ["run", str(TINY), "--layout", "tp=2 pp=2", "--synthetic", "--steps", "2",
            "--resume", str(path)]


def test_resume_refuses_a_crafted_pickle_and_nothing_runs(saved, tmp_path, capsys):
    marker = tmp_path / "pwned"
    crafted = _crafted(tmp_path / "crafted", marker)
    assert main(_resume(crafted)) == 2
    err = capsys.readouterr().err
    assert "pickled .metadata" in err and "Traceback" not in err
    # a pickle dropped into a real checkpoint is a foreign file, refused before anything reads it
    step = _copy(saved, tmp_path)
    shutil.copy(crafted / "__0_0.distcp", step)
    assert main(_resume(step)) == 2
    err = capsys.readouterr().err
    assert "__0_0.distcp is not in its manifest" in err and "Traceback" not in err
    assert not marker.exists()


def test_a_non_finite_step_stops_the_run_or_is_skipped_when_allowed(tmp_path):
    with single_rank(tmp_path):
        for allowed in (0, 1):
            setup = replace(SETUP, optimizer=replace(SETUP.optimizer, skip_bad_steps=allowed))
            trainer = resume_check.build_trainer(setup, Case("z", Layout()), seed=0)
            real = trainer.forward_backward
            trainer.forward_backward = lambda step: real(step) * (float("nan") if step == 1 else 1)
            seen = {}
            def snapshot(t, completed, total):  # noqa: E306
                seen[completed] = t.dp.full_parameters()
            if allowed == 0:
                with pytest.raises(NonFiniteStep, match="step 1: loss nan"):
                    trainer.fit(4, after_step=snapshot)
                assert sorted(seen) == [1]  # nothing saved after the bad step
                continue
            logs = trainer.fit(4, after_step=snapshot)
            assert [l.skipped for l in logs] == [False, True, False, False]
            assert all(torch.equal(seen[1][n], seen[2][n]) for n in seen[1])  # no update
            assert any(not torch.equal(seen[2][n], seen[3][n]) for n in seen[2])


@pytest.mark.tier2
def test_plait_run_stops_on_a_non_finite_loss_with_status_3_keeping_the_last_checkpoint(tmp_path):
    from plait.ir.cluster import local_cpu
    from plait.ir.dsl import load_job
    from plait.runtime.launch import Checkpointing, check_plan, hand_plan, launch_local, resolve_data
    from plait.runtime.train import NON_FINITE_EXIT

    job = load_job(str(TINY))
    job = replace(job, cluster=local_cpu(2), global_batch=4, seq_len=32,  # lr 1e30: activations overflow
                  optimizer=replace(job.optimizer, lr=1e30, min_lr=1e30, warmup=0, grad_clip=0.0),
                  data=replace(job.data, synthetic=True, path=None))
    plan = check_plan(job, hand_plan(job, Layout(dp=2)))
    job = resolve_data(job, tmp_path)
    saves = tmp_path / "ckpt"
    status = launch_local(job, plan, tmp_path / "run", steps=4, quiet=True,
                          ckpt=Checkpointing(save=str(saves), every=1))
    log = (tmp_path / "run" / "rank-0.log").read_text()
    assert status == NON_FINITE_EXIT, log
    assert "non-finite step(s), the job allows skipping 0" in log
    assert "last good checkpoint" in log and "step-000001" in log
    assert sorted(p.name for p in saves.glob("step-*")) == ["step-000001"]
    verify(saves / "step-000001")


def test_cli_resume_of_another_model_is_refused_before_any_rank_starts(saved, tmp_path, capsys):
    assert main(_resume(saved / "ckpt") + ["--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "holds model 'ckpt-test', which differs from this job's" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "job.json").exists()  # nothing was launched
    assert main(["run", str(TINY), "--synthetic", "--allow-job-change"]) == 2
    assert "--allow-job-change needs --resume DIR" in capsys.readouterr().err


def test_a_failed_write_is_reported_and_leaves_no_step_directory(tmp_path, monkeypatch, capsys):
    from plait.runtime import ckpt_store

    def full_disk(*args):
        raise OSError(28, "No space left on device")
    with single_rank(tmp_path):
        trainer = resume_check.build_trainer(SETUP, Case("z", Layout()), seed=0)
        monkeypatch.setattr(ckpt_store, "write", full_disk)
        for asynchronous in (False, True):
            saver = checkpoint.Saver(str(tmp_path / "ckpt"), asynchronous=asynchronous)
            with pytest.raises(PlaitError, match=r"writing checkpoint step 4 failed on rank\(s\) \[0\]"):
                saver(trainer, 4, 4)
                saver.close()
            assert "No space left on device" in capsys.readouterr().err
    assert not (tmp_path / "ckpt" / "step-000004").exists()
    assert not (tmp_path / "ckpt" / "latest").exists()


def test_replacing_a_step_directory_keeps_one_plait_did_not_write(tmp_path):
    """A re-run replaces an old checkpoint of the same step, but never deletes a directory of that
    name that holds no manifest (plait did not write it)."""
    from plait.runtime.ckpt_integrity import _rename_into_place

    for name, theirs in (("step-3", True), ("step-4", False)):
        target, tmp = tmp_path / name, tmp_path / f".{name}.tmp"
        target.mkdir()
        (target / ("notes.txt" if theirs else MANIFEST)).write_text("old")
        tmp.mkdir()
        (tmp / MANIFEST).write_text("new")
        _rename_into_place(tmp, target)
        assert (target / MANIFEST).read_text() == "new" and not tmp.exists()
        kept = [p for p in tmp_path.iterdir() if p.name.startswith(f".{name}.replaced")]
        assert [(p / "notes.txt").read_text() for p in kept] == (["old"] if theirs else [])
