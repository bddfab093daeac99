"""Tier 2: distillation through the compiled runtime. A narrower, shallower student of tiny-dense
distilled from tiny-dense (temperature 2, a quarter LM loss) under TP 2 (sequence parallel,
vocab-parallel KL), DP 2 (ZeRO-1), CP 2 (zigzag token shards, the same on both models), PP 2 (the teacher's own forward-only pipeline, its logits
meeting the student's on the last stage) and TP 2 x PP 2: the step-0 distillation loss and the student's gradients
equal the single-process Distiller's within 1e-5 (fp32); in fp64 the loss and gradients within 1e-12
and the parameters after 2 steps within 1e-9 (fp32 parameters after Adam steps are not comparable:
see test_runtime_parity)."""
from dataclasses import replace

import pytest
import torch

from plait.ir.dsl import load_model
from plait.ir.errors import LayoutError
from plait.ir.plan import Layout
from plait.runtime.distill.parallel import check_distill_layout, teacher_plan
from plait.runtime.harness.distill_parity import DistillSetup, run_distill_parity
from plait.runtime.harness.parity import FP64, Case, Setup, in_fp32_and_fp64

TEACHER = replace(load_model("specs/models/tiny-dense.plait"), layers=("attention", "mlp") * 2)
STUDENT = replace(TEACHER, name="tiny-dense-student", hidden=96, layers=("attention", "mlp"),
                  mlp=replace(TEACHER.mlp, ffn=192))
SETUP = DistillSetup(Setup(STUDENT, global_batch=4, seq=16, steps=2), TEACHER)
CASES = [Case("tp2", Layout(tp=2, sp=True, dp_kind="replicated")), Case("dp2", Layout(dp=2)),
         Case("cp2", Layout(cp=2)), Case("pp2", Layout(pp=2)), Case("tp2-pp2", Layout(tp=2, pp=2, dp_kind="replicated"))]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distill_parity(SETUP, in_fp32_and_fp64(CASES), str(tmp_path_factory.mktemp("distill")))


@pytest.mark.tier2
@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_distillation_under_a_parallel_layout_equals_one_process(results, name):
    fp32, fp64 = results[name], results[f"{name} {FP64}"]
    assert fp32.loss < 1e-5 and fp32.grads < 1e-5, fp32
    assert fp64.loss < 1e-12 and fp64.grads < 1e-12 and fp64.params < 1e-9, fp64


def test_the_teacher_is_lowered_over_its_own_layers():
    plan = CASES[0].plan(STUDENT, 4, 16)
    stages = teacher_plan(plan, TEACHER).stages
    assert [(s.first, s.last) for s in stages] == [(0, TEACHER.num_layers)]
    stages = teacher_plan(Case("pp2", Layout(pp=2)).plan(STUDENT, 4, 16), TEACHER).stages
    assert [(s.first, s.last) for s in stages] == [(0, 2), (2, 4)]  # its own even split over pp


def test_a_teacher_too_shallow_for_the_pipeline_and_other_vocabularies_are_refused():
    with pytest.raises(LayoutError, match="teacher's 1 layers cannot fill pp\\*vpp = 2\\*1 = 2"):
        check_distill_layout(Layout(pp=2), STUDENT, replace(TEACHER, layers=("mlp",)))
    with pytest.raises(LayoutError, match="student's 2 layers cannot fill"):
        check_distill_layout(Layout(pp=3), STUDENT, TEACHER)
    with pytest.raises(LayoutError, match="vocabulary"):
        check_distill_layout(Layout(dp=2), replace(STUDENT, vocab=512), TEACHER)
