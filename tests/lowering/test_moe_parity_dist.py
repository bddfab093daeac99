"""Tier 2: the MoE numerics matrix. tiny-moe (8 experts, top-2, a gated shared expert, aux loss)
compiled and trained one step by the runtime under expert-parallel layouts on 2 and 4 gloo ranks,
each dropless and with a capacity factor that drops tokens: loss, every gradient and every
parameter after one clipped AdamW step equal the single-device reference with the same per-rank
semantics within 1e-5
(runtime.harness.parity: the harness the dense layouts use too, expert shards reassembled over EP x ETP).

Layouts are "dense | expert": attention / MLP layers on TP x CP x DP x PP, MoE layers on ETP x EP x
EDP x PP over the same ranks (Megatron-Core order tp-cp-ep-dp-pp). With CP folded into EP, each CP
rank routes its two zigzag chunks of every sequence; its capacity covers those two chunks together
(the reference: `build_model(capacity_segments=tp*cp, capacity_cp=cp)`).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from plait.ir.dsl import load_model
from plait.ir.job import MoEOptions, Optimizer
from plait.ir.plan import Layout
from plait.runtime.harness.parity import Case, Setup, reference, reference_key, run_parity

pytestmark = pytest.mark.tier2
torch.set_num_threads(1)

SPEC = load_model(str(Path(__file__).resolve().parents[2] / "specs" / "models" / "tiny-moe.plait"))
# the same model with aux-loss-free balancing: a selection bias updated once per step
BIAS_SPEC = replace(SPEC, moe=replace(SPEC.moe, expert_bias=True))
SETUP = Setup(SPEC, seq=16, steps=1,
              optimizer=Optimizer(lr=1e-3, min_lr=1e-4, warmup=1, weight_decay=0.1, grad_clip=0.05))
TOL = 1e-5

CAPACITY = MoEOptions(capacity_factor=0.5, drop_policy="probs")
POSITION_PAD = MoEOptions(capacity_factor=0.5, drop_policy="position", pad_to_capacity=True)
# aux-loss-free balancing: a rate large enough that the step-1 bias changes step 2's routing
BIAS = MoEOptions(expert_bias_rate=0.05)


def moe_case(name: str, layout: Layout, moe: MoEOptions | None = None, micro: int = 1,
             steps: int = 1, z_loss: float = 0.0, spec=SPEC) -> Case:
    """``micro`` micro-batches per DP rank; a z-loss coefficient > 0 changes the spec."""
    if z_loss:
        spec = replace(spec, moe=replace(spec.moe, z_loss=z_loss))
    return Case(name, layout, moe=moe, spec=spec, global_batch=layout.dp * layout.mbs * micro,
                steps=steps)


def both(name: str, layout: Layout, capacity: MoEOptions = CAPACITY, **kw) -> dict[str, Case]:
    cases = (moe_case(f"{name} dropless", layout, **kw), moe_case(f"{name} capacity", layout, capacity, **kw))
    return {c.name: c for c in cases}


CASES_2 = {
    **both("ep2 (dp2 | ep2), 2 micro-batches", Layout(dp=2, ep=2, mbs=2), micro=2),
    **both("tp2 folded (tp2 sp | etp1 ep2)", Layout(tp=2, sp=True, ep=2, mbs=2), POSITION_PAD),
    # CP ranks as EP ranks; with a z-loss too (its share is scaled like the aux loss's)
    **both("cp2 folded into ep2 (cp2 | ep2), z-loss", Layout(cp=2, ep=2, mbs=2), z_loss=0.01),
}
CASES_4 = {
    **both("ep4 (dp4 | ep4)", Layout(dp=4, ep=4, mbs=2, dp_kind="replicated")),
    **both("ep2 x etp2 (dp4 | etp2 ep2)", Layout(dp=4, ep=2, etp=2, mbs=2), POSITION_PAD),
    **both("tp2 x ep2 x pp2 (tp2 sp pp2 | ep2 pp2)", Layout(tp=2, sp=True, pp=2, ep=2, mbs=1), micro=2),
    **both("dp x ep (dp4 | ep2 edp2)", Layout(dp=4, ep=2, edp=2, mbs=2)),
    # FSDP over dp-cp shards the expert weights too: allowed when EDP spans the same ranks
    **both("tp2 sp dp2 fsdp (tp2 sp dp2 | ep2 edp2)", Layout(tp=2, sp=True, dp=2, ep=2, edp=2, mbs=2,
                                                            dp_kind="fsdp")),
    "ep4 allgather (dp4 | ep4) capacity": moe_case("ep4 allgather (dp4 | ep4) capacity", Layout(
        dp=4, ep=4, mbs=2, dispatcher="allgather"), POSITION_PAD),
    # a TP x CP token group of 4 (aux-loss counts summed over both), folded into ep4
    **both("tp2 x cp2 folded into ep4 (tp2 sp cp2 | ep4)", Layout(tp=2, sp=True, cp=2, ep=4, mbs=2),
           POSITION_PAD),
}


def bias_case(name: str, layout: Layout) -> dict[str, Case]:
    return {name: moe_case(name, layout, BIAS, steps=2, spec=BIAS_SPEC)}


# two whole training steps with the expert-bias update: the load all-reduced over the stage's
# token-holding ranks (DP; TP x DP), the same update on every rank
BIAS_2 = {**bias_case("expert bias, 2 steps (dp2 | ep2)", Layout(dp=2, ep=2, mbs=2)),
          **bias_case("expert bias, 2 steps (cp2 | ep2)", Layout(cp=2, ep=2, mbs=2))}
BIAS_4 = bias_case("expert bias, 2 steps (tp2 sp dp2 | ep2 edp2)",
                   Layout(tp=2, sp=True, dp=2, ep=2, edp=2, mbs=2))


def check(results: dict, case: Case) -> None:
    """Step-0 loss and gradients and the parameters after one clipped AdamW step within 1e-5
    (relative to a tensor's scale where it exceeds 1); a capacity really drops tokens."""
    err = results[case.name]
    assert err.loss <= TOL, f"loss differs by {err.loss:.3g}"
    assert err.grads <= TOL, f"gradient of {err.worst_grad} differs by {err.grads:.3g}"
    assert err.params <= TOL, f"{err.worst_param} after one step differs by {err.params:.3g}"
    if case.moe is not None:  # the dropless reference differs
        dropless = reference(*reference_key(SETUP, replace(case, moe=None)))
        assert abs(dropless["loss"] - reference(*reference_key(SETUP, case))["loss"]) > 1e-6


def check_bias(results: dict, case: Case) -> None:
    """Every rank's bias of every MoE layer it runs == the reference's, bit for bit; loss and
    gradients at step 0 and parameters after the steps within tolerance; and the update really
    changed training."""
    err = results[case.name]
    assert err.loss <= TOL and err.grads <= TOL, err
    # two AdamW steps under CP: Adam's nearly scale-free update turns the ~1e-9 rounding of the
    # ring's reordered sums into up to ~1.5e-5 on a few entries with tiny gradients (ring and
    # all-to-all CP differ from each other by as much; the one-step cases keep 1e-5)
    tol = 1e-4 if case.layout.cp > 1 else TOL
    assert err.params <= tol, f"{err.worst_param} differs by {err.params:.3g}"
    assert err.biases == 0.0, f"an expert bias differs by {err.biases:.3g}"
    setup, calls = reference_key(SETUP, case)
    ref = reference(setup, calls)
    assert len(ref["biases"]) == 3 and all(b.abs().sum() > 0 for b in ref["biases"].values())
    frozen = reference(replace(setup, moe=replace(setup.moe, expert_bias_rate=0.0)), calls)
    moved = max((frozen["params"][n] - p).abs().max() for n, p in ref["params"].items())
    assert moved > 1e-6, "the bias update did not change step 2's routing"


class TestTwoRanks:
    @pytest.fixture(scope="class")
    @classmethod
    def results(cls, tmp_path_factory):
        return run_parity(SETUP, [*CASES_2.values(), *BIAS_2.values()],
                          str(tmp_path_factory.mktemp("moe2")))

    @pytest.mark.parametrize("name", list(CASES_2))
    def test_matches_reference(self, results, name):
        check(results, CASES_2[name])

    @pytest.mark.parametrize("name", list(BIAS_2))
    def test_expert_bias_matches_reference(self, results, name):
        check_bias(results, BIAS_2[name])


class TestFourRanks:
    @pytest.fixture(scope="class")
    @classmethod
    def results(cls, tmp_path_factory):
        return run_parity(SETUP, [*CASES_4.values(), *BIAS_4.values()],
                          str(tmp_path_factory.mktemp("moe4")))

    @pytest.mark.parametrize("name", list(CASES_4))
    def test_matches_reference(self, results, name):
        check(results, CASES_4[name])

    @pytest.mark.parametrize("name", list(BIAS_4))
    def test_expert_bias_matches_reference(self, results, name):
        check_bias(results, BIAS_4[name])
