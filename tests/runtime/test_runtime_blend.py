"""The blended loader: realised fractions, epoch caps, one global order for every layout, resume,
phase switches — read through real indexed datasets whose tokens name their source."""
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from plait.ir.dsl import load_job
from plait.ir.errors import PlaitError
from plait.ir.indexed import IndexedWriter
from plait.ir.job import Data, DataPhase, DataSource
from plait.ir.plan import Layout
from plait.planner.groups import group_of
from plait.runtime.data_blend import blended_loader

TINY = Path(__file__).resolve().parents[2] / "specs" / "jobs" / "tiny-local.plait"
SEQ, BATCH, STEPS = 16, 8, 60
SIZES = {"web": 400, "math": 90, "code": 40}  # windows of SEQ + 1 tokens


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Source k's tokens are 10 * k + (position % 10): a window's first token names its source."""
    root = tmp_path_factory.mktemp("blend")
    out = []
    for k, (name, windows) in enumerate(SIZES.items()):
        w = IndexedWriter(root / name, np.uint16)
        for doc in range(windows):  # documents of SEQ tokens: windows = (tokens - 1) // SEQ
            w.add_document(10 * k + np.arange(doc * SEQ, (doc + 1) * SEQ) % 10)
        w.add_document([10 * k])
        w.close()
        out.append(DataSource(name, str(root / name)))
    return tuple(out)


def blend_job(sources, phases, epochs=None, steps=STEPS):
    if epochs:
        sources = tuple(replace(s, epochs=epochs.get(s.name)) for s in sources)
    job = load_job(str(TINY))
    return replace(job, seq_len=SEQ, global_batch=BATCH, steps=steps,
                   data=Data(sources=sources, phases=tuple(phases), seed=5))


PHASES = [DataPhase("p1", (("web", 0.5), ("math", 0.3), ("code", 0.2))),
          DataPhase("p2", (("web", 0.25), ("math", 0.75)), at=0.5)]


def _source_of(batch) -> np.ndarray:
    return (batch.tokens[:, 0] // 10).numpy()


def test_realised_fractions_match_the_weights_within_one_sample(sources):
    loader = blended_loader(blend_job(sources, PHASES), SEQ, BATCH)
    seen = np.concatenate([_source_of(loader.local_batch(s)) for s in range(STEPS)])
    for phase, part in ((PHASES[0], seen[:240]), (PHASES[1], seen[240:])):
        w = np.array([dict(phase.weights).get(n, 0.0) for n in SIZES])
        realised = np.cumsum(np.eye(3)[part], axis=0)
        deviation = np.abs(realised - np.outer(np.arange(1, len(part) + 1), w)).max()
        print(f"\n{phase.name}: realised {realised[-1].astype(int).tolist()} of {len(part)}, "
              f"max prefix deviation {deviation:.2f} samples")
        assert deviation < 1.0
    assert set(seen[240:]) == {0, 1}  # phase 2 switches code off exactly at 50% of the samples


def test_a_source_is_drawn_without_repeats_within_an_epoch(sources):
    loader = blended_loader(blend_job(sources, PHASES[:1]), SEQ, BATCH)
    picks = [loader.global_samples(s) for s in range(STEPS)]
    src = np.concatenate([p[0] for p in picks])
    win = np.concatenate([p[1] for p in picks])
    code = win[src == 2]  # 96 draws of 40 windows: epochs 0 and 1 are permutations
    assert sorted(code[:40]) == list(range(40)) and sorted(code[40:80]) == list(range(40))
    assert not np.array_equal(code[:40], code[40:80])  # each epoch reshuffled


def test_epoch_caps_refuse_a_budget_that_exceeds_them(sources):
    job = blend_job(sources, PHASES[:1], epochs={"code": 2.0})
    with pytest.raises(PlaitError, match=r"'code' would give 96 samples = 2.40 epochs .* cap of 2"):
        blended_loader(job, SEQ, BATCH)
    blended_loader(blend_job(sources, PHASES[:1], epochs={"code": 2.5}), SEQ, BATCH)  # within the cap


@pytest.mark.parametrize("layout", [Layout(dp=2), Layout(tp=2), Layout(dp=2, tp=2),
                                    Layout(dp=2, pp=2), Layout(dp=4, tp=2)])
def test_every_layout_reads_the_same_global_order(sources, layout):
    """Each rank builds its loader as the trainer does (its dp group's size and its index in it):
    DP shares concatenate to the one-device global batch; TP / PP peers read the same rows."""
    job = blend_job(sources, PHASES)
    whole = [blended_loader(job, SEQ, BATCH).local_batch(s).tokens for s in (0, 29, 30, 59)]
    for rank in range(layout.world):
        dp_group = group_of(layout, "dense", "dp", rank)
        d = dp_group.index(rank)
        loader = blended_loader(job, SEQ, BATCH, dp_rank=d, dp_size=len(dp_group))
        share = BATCH // len(dp_group)
        for step, expected in zip((0, 29, 30, 59), whole):
            assert torch.equal(loader.local_batch(step).tokens, expected[d * share:(d + 1) * share])


def test_resume_at_any_step_continues_the_same_sequence(sources):
    job = blend_job(sources, PHASES)
    straight = blended_loader(job, SEQ, BATCH)
    run = [straight.local_batch(s).tokens for s in range(STEPS)]
    resumed = blended_loader(job, SEQ, BATCH)  # a new process: only the step is restored
    for s in (37, 38, 59):
        assert torch.equal(resumed.local_batch(s).tokens, run[s])


def test_the_seed_changes_the_order_not_the_counts(sources):
    a = blended_loader(blend_job(sources, PHASES), SEQ, BATCH)
    job = blend_job(sources, PHASES)
    b = blended_loader(replace(job, data=replace(job.data, seed=6)), SEQ, BATCH)
    sa, sb = a.global_samples(3), b.global_samples(3)
    assert np.array_equal(sa[0], sb[0]) and not np.array_equal(sa[1], sb[1])


@pytest.mark.tier2
def test_plait_run_trains_on_the_blend_under_any_layout_and_resumes(sources, tmp_path):
    """Two ranks as dp2 and as tp2 see the blend's batches: step 0's loss is the reference model's
    loss on the blend's first global batch, both layouts log the same losses, and a resume from
    step 1's checkpoint continues bit for bit."""
    from plait.ir.cluster import local_cpu
    from plait.lowering.build import build_model
    from plait.runtime.launch import Checkpointing, check_plan, hand_plan, launch_local, resolve_data

    job = replace(blend_job(sources, PHASES, steps=4), cluster=local_cpu(2))
    job = resolve_data(job, tmp_path)
    batch = blended_loader(job, SEQ, BATCH).local_batch(0)
    with torch.no_grad():
        expected = float(build_model(job.model, seed=job.seed)(batch.tokens, batch.labels))
    logs = {}
    for name, layout in (("dp2", Layout(dp=2, dp_kind="zero1")), ("tp2", Layout(tp=2))):
        plan = check_plan(job, hand_plan(job, layout))
        ckpt = Checkpointing(save=str(tmp_path / f"ckpt-{name}"), every=1) if name == "dp2" else Checkpointing()
        assert launch_local(job, plan, tmp_path / name, steps=3, quiet=True, ckpt=ckpt) == 0
        logs[name] = [e["loss"] for e in json.loads((tmp_path / name / "log.json").read_text())]
    print(f"\nreference step-0 loss {expected:.6f}; dp2 {logs['dp2']}; tp2 {logs['tp2']}")
    assert logs["dp2"][0] == pytest.approx(expected, abs=1e-5)
    assert logs["tp2"] == pytest.approx(logs["dp2"], abs=1e-5)
    plan = check_plan(job, hand_plan(job, Layout(dp=2, dp_kind="zero1")))
    assert launch_local(job, plan, tmp_path / "resumed", steps=3, quiet=True,
                        ckpt=Checkpointing(resume=str(tmp_path / "ckpt-dp2" / "step-000001"))) == 0
    resumed = [e["loss"] for e in json.loads((tmp_path / "resumed" / "log.json").read_text())]
    assert resumed == logs["dp2"][1:]


def test_a_checkpoint_names_the_recipe_so_a_changed_blend_is_a_different_job(sources):
    from plait.runtime.ckpt_integrity import dataset_identity

    job = blend_job(sources, PHASES)
    identity = dataset_identity(job.data)
    assert identity["sources"]["web"]["tokens"] == 400 * SEQ + 1
    other = replace(job.data, phases=(PHASES[0], replace(PHASES[1], at=0.4)))
    assert dataset_identity(other) != identity and dataset_identity(job.data) == identity


def test_a_data_flag_replaces_the_jobs_blend(sources):
    from plait.commands.run import with_data

    job = blend_job(sources, PHASES)
    assert with_data(job, "/some/dir", False).data.sources == ()
    assert with_data(job, None, True).data.phases == () and with_data(job, None, False) == job
