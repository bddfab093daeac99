"""Tier 2: `plait prune` calibrates data parallel and distils in the compiled runtime when the
prune job's layout pins more than one rank. The same job pinned to dp = 2 and unpinned (one
process, the reference Distiller) prunes to the same model, and the two distilled students agree
within 1e-5 (fp32)."""
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plait.ir import counts
from plait.ir.errors import LayoutError
from plait.ir.job import AxisSearch, Calibration, Distill, LayoutPins, Optimizer, PruneJob, PruneTarget
from plait.ir.plan import Layout
from plait.planner.prune.scores import ImportanceScores
from plait.runtime.distill.launch import DistillRun, check_run, layout_from_pins

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "lowering"))
from prune_util import DENSE  # noqa: E402

MODEL = replace(DENSE, vocab=256, name="micro-bytes")


def _job(tmp_path, out: str, pins=()) -> PruneJob:
    return PruneJob(name="micro-half", model=MODEL, weights=str(tmp_path / "teacher.safetensors"),
                    target=PruneTarget(params=int(0.6 * counts.params(MODEL).total)),
                    axes=(AxisSearch("hidden", "search"), AxisSearch("ffn", "search")), depth=("mlp",),
                    calibration=Calibration(samples=4, seq_len=16, batch=2), layout=LayoutPins(pins),
                    distill=Distill(steps=3, global_batch=2, seq_len=16, checkpoint_every=2, lm_loss=0.3,
                                    temperature=2.0, optimizer=Optimizer(lr=1e-3, warmup=1)),
                    output=str(tmp_path / out))


def test_layout_pins_become_the_distillation_layout():
    assert layout_from_pins(LayoutPins((("tp", 2), ("sp", True), ("dp", 2)))) == Layout(tp=2, sp=True, dp=2)
    assert layout_from_pins(LayoutPins()).world == 1


def test_an_illegal_layout_is_refused_before_any_process_starts(tmp_path):
    run = DistillRun(MODEL, MODEL, Layout(tp=3), Distill(global_batch=2, seq_len=16), "unused", 1, str(tmp_path))
    with pytest.raises(LayoutError, match=r"heads \(4\) must be divisible by tp \(3\)"):
        check_run(run)
    with pytest.raises(LayoutError, match="student's 4 layers cannot fill pp\\*vpp = 8\\*1 = 8"):
        check_run(replace(run, layout=Layout(pp=8)))


@pytest.mark.tier2
def test_plait_prune_distils_under_dp2_like_one_process(tmp_path, capfd):
    from plait.pruning import run_prune, train_teacher

    said = []
    train_teacher(_job(tmp_path, "single"), 3, say=said.append)
    single = run_prune(_job(tmp_path, "single"), say=said.append)
    parallel = run_prune(_job(tmp_path, "dp2", (("dp", 2),)), say=said.append)
    assert any("under tp1 cp1 dp2 pp1" in s for s in said)
    assert any("calibrating data parallel on up to 2 processes" in s for s in said)
    got_s, want_s = (ImportanceScores.from_json((tmp_path / d / "importance.json").read_text()) for d in ("dp2", "single"))
    assert got_s.tokens == want_s.tokens and all(
        math.isclose(a, b, rel_tol=1e-9) for a, b in zip(got_s.hidden + got_s.layers[1].units,
                                                          want_s.hidden + want_s.layers[1].units))
    assert (tmp_path / "dp2" / "model.plait").read_text() == (tmp_path / "single" / "model.plait").read_text()
    want = load_file(str(tmp_path / "single" / "distilled.safetensors"))
    got = load_file(str(tmp_path / "dp2" / "distilled.safetensors"))
    assert set(got) == set(want)
    worst = max((got[n] - want[n]).abs().max().item() for n in want)
    print(f"distilled weights dp2 vs one process: max |diff| {worst:.2e}")
    assert worst < 1e-5
    assert abs(parallel["distill_final_kl"] - single["distill_final_kl"]) < 1e-5
    assert abs(parallel["distilled_loss"] - single["distilled_loss"]) < 1e-5
    assert not torch.equal(got["embed.weight"], load_file(str(tmp_path / "dp2" / "model.safetensors"))["embed.weight"])
    # more steps: both resume from their checkpoints at step 3 (the runtime's from DCP in RUN/distill/)
    capfd.readouterr()
    single = run_prune(_job(tmp_path, "single"), say=said.append, steps=5)
    parallel = run_prune(_job(tmp_path, "dp2", (("dp", 2),)), say=said.append, steps=5, on_step=print)
    assert "resuming at step 3 of 5" in capfd.readouterr().out
    assert abs(parallel["distilled_loss"] - single["distilled_loss"]) < 1e-5
