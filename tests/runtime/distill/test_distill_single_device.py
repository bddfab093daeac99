"""Distillation: the loss, exact resumption from a checkpoint, and the whole `plait prune` run
(teacher -> importance -> plan -> slice -> distill) in a resumable run directory."""
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from plait.ir import counts
from plait.ir.errors import PlaitError
from plait.ir.job import AxisSearch, Calibration, Distill, Optimizer, PruneJob, PruneTarget
from plait.lowering.build import build_model
from plait.runtime.data import BatchLoader, SyntheticTokens
from plait.runtime.distill.single_device import Distiller, distill_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "lowering"))
from prune_util import DENSE  # noqa: E402

torch.set_num_threads(1)


def test_distill_loss_terms():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 10, generator=g), torch.randn(2, 3, 10, generator=g)
    labels = torch.randint(0, 10, (2, 3), generator=g)
    loss, kl, lm = distill_loss(teacher, teacher, labels)
    assert kl.item() == pytest.approx(0, abs=1e-7)
    loss, kl, lm = distill_loss(student, teacher, labels, temperature=2.0, lm_weight=0.25)
    p = F.softmax(teacher / 2, -1)
    manual = (p * (F.log_softmax(teacher / 2, -1) - F.log_softmax(student / 2, -1))).sum(-1).mean() * 4
    ce = F.cross_entropy(student.flatten(0, 1), labels.flatten())
    assert kl.item() == pytest.approx(manual.item(), rel=1e-6) and lm.item() == pytest.approx(ce.item(), rel=1e-6)
    assert loss.item() == pytest.approx(0.75 * manual.item() + 0.25 * ce.item(), rel=1e-6)


class Stop(Exception):
    pass


def _distiller(steps):
    small = replace(DENSE, mlp=replace(DENSE.mlp, ffn=16))
    loader = BatchLoader(SyntheticTokens(64, seed=1), 8, 4, seed=2)
    return Distiller(build_model(small, seed=3), build_model(DENSE, seed=4), loader,
                     Optimizer(lr=1e-2, min_lr=1e-3, warmup=1), steps, temperature=1.5, lm_weight=0.3)


def test_resumed_distillation_equals_an_uninterrupted_one(tmp_path):
    whole = _distiller(4)
    whole.fit()
    interrupted = _distiller(4)

    def checkpoint(d):
        d.save(tmp_path / "state.pt")
        if d.step == 2:
            raise Stop  # killed right after the step-2 checkpoint
    with pytest.raises(Stop):
        interrupted.fit(checkpoint=checkpoint, every=2)
    resumed = _distiller(4)
    resumed.load(tmp_path / "state.pt")
    assert resumed.step == 2 and len(resumed.logs) == 2
    resumed.fit()
    for (name, a), b in zip(whole.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.equal(a, b), name
    assert [l.loss for l in whole.logs] == [l.loss for l in resumed.logs]


@torch.no_grad()
def _kl(d, tokens):
    return distill_loss(d.student(tokens), d.teacher(tokens), tokens, d.temperature)[1].item()


def test_distillation_pulls_the_student_towards_the_teacher():
    d = _distiller(12)
    with torch.no_grad():
        d.teacher.head.weight.mul_(30)  # a confident teacher, far from the near-uniform student
    held_out = BatchLoader(SyntheticTokens(64, seed=9), 8, 4).local_batch(0).tokens
    before = _kl(d, held_out)
    d.fit()
    assert _kl(d, held_out) < 0.9 * before


def _job(tmp_path, **changes) -> PruneJob:
    model = replace(DENSE, vocab=256, name="micro-bytes")
    job = PruneJob(name="micro-half", model=model, weights=str(tmp_path / "teacher.safetensors"),
                   target=PruneTarget(params=int(0.6 * counts.params(model).total)),
                   axes=(AxisSearch("hidden", "search"), AxisSearch("ffn", "search")), depth=("mlp",),
                   calibration=Calibration(samples=4, seq_len=16, batch=2),
                   distill=Distill(steps=3, global_batch=2, seq_len=16, checkpoint_every=2,
                                   optimizer=Optimizer(lr=1e-3, warmup=1)),
                   output=str(tmp_path / "run"))
    return replace(job, **changes)


def test_plait_prune_runs_and_resumes(tmp_path):
    from plait.pruning import run_prune, train_teacher

    job = _job(tmp_path)
    said = []
    train_teacher(job, 3, say=said.append)
    report = run_prune(job, say=said.append)
    run = tmp_path / "run"
    for name in ("job.json", "importance.json", "plan.json", "model.plait", "model.safetensors", "distill.pt",
                 "distilled.safetensors", "report.json"):
        assert (run / name).exists(), name
    assert report["params_after"] <= job.target.params < report["params_before"]
    assert json.loads((run / "report.json").read_text()) == report
    from plait.ir.dsl import load_model
    pruned = load_model(str(run / "model.plait"))
    assert counts.params(pruned).total == report["params_after"]
    said.clear()
    again = run_prune(job, say=said.append, steps=5)  # more steps: resumes from the checkpoint at step 3
    assert any("reusing" in s for s in said) and any("resuming at step 3 of 5" in s for s in said)
    assert again["distill_steps"] == 5
    with pytest.raises(PlaitError, match="holds a run of a different"):
        run_prune(_job(tmp_path, target=PruneTarget(params=10 ** 5)), say=said.append)
    with pytest.raises(PlaitError, match="do not match model"):
        run_prune(_job(tmp_path, model=replace(job.model, hidden=48)), fresh=True, say=said.append)
