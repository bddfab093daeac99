"""Per-step metrics and validation on one in-process rank: the JSONL stream, MFU from the cost
model's FLOPs, labelled memory, a held-out split training never reads, a validation loss equal to
the reference model's on those windows, and training unchanged by validating."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from plait.ir import counts
from plait.ir.cluster import local_cpu
from plait.ir.job import Data, Optimizer, TrainJob
from plait.ir.model import MLP, Attention, ModelSpec, Rope
from plait.ir.plan import Layout
from plait.lowering.build import build_model
from plait.runtime import mesh as mesh_mod
from plait.runtime import metrics, validation
from plait.runtime.data import MemmapTokens, bundled_corpus, prepare
from plait.runtime.launch import hand_plan
from plait.runtime.train import Trainer
from plait.runtime.worker import StepHooks

SPEC = ModelSpec(name="metrics-test", vocab=256, hidden=32, layers=("attention", "mlp") * 2,
                 attention=Attention(heads=4, kv_heads=2, head_dim=8, rope=Rope()), mlp=MLP(ffn=48))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "corpus"
    prepare([bundled_corpus()], out)
    return out


@pytest.fixture
def one_rank(tmp_path):
    mesh_mod.init_distributed("gloo", 60, f"file://{tmp_path}/rdzv", 0, 1)
    yield tmp_path
    mesh_mod.destroy()


def _job(corpus, val_every: int = 0) -> TrainJob:
    return TrainJob(name="metrics", model=SPEC, cluster=local_cpu(1), global_batch=4, seq_len=16,
                    precision=None, optimizer=Optimizer(lr=1e-3, warmup=1), steps=4,
                    data=Data(path=str(corpus), val_every=val_every,
                              val_fraction=0.25 if val_every else 0.0, val_batches=2))


def _trainer(job, source=None) -> Trainer:
    plan = hand_plan(job, Layout())
    return Trainer(job, plan, mesh_mod.build_mesh(plan.layout, 60), source=source)


def test_the_held_out_split_is_the_tail_and_training_never_reads_it(corpus):
    source = MemmapTokens(corpus)
    data = Data(path=str(corpus), val_every=5, val_fraction=0.25)
    total = source.num_windows(17)
    train = validation.training_part(source, data, 16)
    held = validation.Part(source, 17, train=False, fraction=0.25)
    assert train.num_windows(17) + held.num_windows(17) == total
    assert held.num_windows(17) == int(total * 0.25)
    assert np.array_equal(held.window(0, 17), source.window(train.num_windows(17), 17))
    assert validation.training_part(source, Data(path=str(corpus)), 16) is source


def test_validation_loss_is_the_reference_models_loss_on_the_held_out_windows(corpus, one_rank):
    job = _job(corpus, val_every=2)
    trainer = _trainer(job)
    loader = validation.validation_loader(trainer.source, job.data, 16, 4, 0, 1, torch.device("cpu"))
    loss, tokens = validation.validation_loss(trainer, loader, 3)
    reference = build_model(SPEC, seed=job.seed)
    batches = 3
    with torch.no_grad():
        want = sum(float(reference(b.tokens, b.labels)) for b in map(loader.local_batch, range(batches)))
    assert loss == pytest.approx(want / batches, rel=1e-5) and tokens == batches * 4 * 16


def test_metrics_stream_and_validating_leaves_training_unchanged(corpus, one_rank):
    job = _job(corpus, val_every=2)
    trainer = _trainer(job)
    with StepHooks(trainer, one_rank, {}, None, 4, 0, open(one_rank / "console", "w")) as hooks:
        with_val = [log.loss for log in trainer.fit(4, hooks.on_step, 0, hooks.after_step)]
    plain = _trainer(replace(job, data=Data(path=str(corpus))),
                     source=validation.training_part(trainer.source, job.data, 16))
    assert [log.loss for log in plain.fit(4)] == with_val  # bit for bit

    train = metrics.read(one_rank, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["loss"] for r in train] == with_val
    assert [r["step"] for r in metrics.read(one_rank, "validation")] == [2, 4]
    first = train[0]
    flops = 4 * 16 * counts.flops_per_token(SPEC, 16)
    assert first["mfu"] * first["step_time_s"] * job.cluster.device.peak_flops("bf16") == \
        pytest.approx(flops)
    assert first["memory_kind"] == "cpu_peak_rss" and first["memory_bytes"] > 10 * 2**20
    assert {"grad_norm", "lr", "tokens_per_s"} <= set(first)
    assert "validation after step 2: loss" in (one_rank / "console").read_text()
    json.loads((one_rank / "metrics.jsonl").read_text().splitlines()[-1])  # whole lines only
