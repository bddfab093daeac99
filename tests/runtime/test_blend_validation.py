"""A held-out validation split per blend source: each source keeps its last val_fraction of
windows out of training, and validation reports each source's loss (one in-process rank)."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from plait.ir.job import Data, DataPhase
from plait.ir.plan import Layout
from plait.lowering.build import build_model
from plait.runtime import mesh as mesh_mod
from plait.runtime import validation
from plait.runtime.data_blend import blended_loader
from plait.runtime.launch import hand_plan
from plait.runtime.train import Trainer

from test_runtime_blend import BATCH, SEQ, SIZES, blend_job, sources  # noqa: F401 (fixture)

FRACTION = 0.25
BLEND = [DataPhase("blend", (("web", 0.5), ("math", 0.3), ("code", 0.2)))]


def _validated(job):
    return replace(job, precision=None,  # fp32, as the reference below
                   data=replace(job.data, val_every=2, val_fraction=FRACTION, val_batches=2))


def test_training_draws_only_from_each_sources_training_part(sources):  # noqa: F811
    job = _validated(blend_job(sources, BLEND, steps=40))
    loader = blended_loader(job, SEQ, BATCH)
    assert loader.windows == [n - int(n * FRACTION) for n in SIZES.values()]
    for step in range(40):
        src, window = loader.global_samples(step)
        for k, part in enumerate(loader.sources):
            assert window[src == k].max(initial=-1) < part.count and part.first == 0


@pytest.fixture
def one_rank(tmp_path):
    mesh_mod.init_distributed("gloo", 60, f"file://{tmp_path}/rdzv", 0, 1)
    yield tmp_path
    mesh_mod.destroy()


def test_validation_reports_each_sources_loss_on_its_held_out_windows(sources, one_rank):  # noqa: F811
    job = _validated(blend_job(sources, BLEND, steps=4))
    plan = hand_plan(job, Layout())
    trainer = Trainer(job, plan, mesh_mod.build_mesh(plan.layout, 60))
    loaders = validation.validation_loaders(trainer)
    assert list(loaders) == list(SIZES)
    loss, tokens, per = validation.validation_losses(trainer, loaders, 2)
    reference = build_model(job.model, seed=job.seed)
    batches = {}
    for name, loader in loaders.items():
        held = loader.source
        assert held.first == SIZES[name] - int(SIZES[name] * FRACTION)  # the source's tail
        batches[name] = min(2, held.count // BATCH)  # code's 10 held-out windows: one batch
        with torch.no_grad():
            want = np.mean([float(reference(b.tokens, b.labels))
                            for b in map(loader.local_batch, range(batches[name]))])
        assert per[name] == pytest.approx(want, rel=1e-5)
    assert batches == {"web": 2, "math": 2, "code": 1}
    assert len(set(per.values())) == 3  # three different splits, three losses
    assert tokens == 5 * BATCH * SEQ  # the overall loss weighs each source by its tokens
    assert loss == pytest.approx(sum(per[n] * batches[n] for n in per) / 5)
