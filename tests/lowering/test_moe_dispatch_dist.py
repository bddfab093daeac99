"""Tier 2: the expert-parallel MoE block with each token dispatcher on 2 and 4 gloo ranks against
the single-device reference block.

Every rank holds its own tokens X_r (a data-parallel shard). The objective is sum_r <block(X_r), G_r>
plus each call's aux / z loss, so the reference is the reference block run once per rank's tokens
(capacity then has the same per-rank semantics). Outputs, input gradients and parameter gradients
(expert shards summed over EDP, dense ones over all ranks) must match within 1e-5.
"""
from __future__ import annotations

import pytest
import torch

from plait.ir.job import MoEOptions
from plait.ir.model import MoE
from plait.ir.plan import Layout
from plait.lowering.modules import routing
from plait.lowering.modules.moe import MoEBlock
from plait.lowering.moe import ExpertGrid, ExpertParallelMoE, shard_experts
from plait.lowering.moe import comm

from dist_util import spawn
from moe_dist_util import bind_layout, max_err

pytestmark = pytest.mark.tier2

SPEC = MoE(experts=8, top_k=2, ffn=16, shared_ffn=24, shared_gate=True, aux_loss=0.01, z_loss=0.001)
HIDDEN, BATCH, SEQ = 16, 2, 6
MODES = {
    "dropless": dict(),
    "cap-probs": dict(capacity_factor=0.5, drop_policy="probs"),
    "cap-position": dict(capacity_factor=0.5, drop_policy="position"),
    "cap-pad": dict(capacity_factor=0.5, drop_policy="probs", pad_to_capacity=True),
}


def reference_block(options: MoEOptions, starved: bool) -> MoEBlock:
    torch.manual_seed(0)
    b = MoEBlock(SPEC, HIDDEN, options)
    with torch.no_grad():
        for p in b.parameters():
            p.normal_(0, 0.3)
        if starved:  # experts 3..7 never win: EP rank 1 (experts 4..7) and expert 3 get no tokens
            b.router.weight[3:] = -1.0
    return b


def inputs(world: int, starved: bool):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(world, BATCH, SEQ, HIDDEN, generator=g)
    if starved:
        x = x.abs() + 0.5
    return x, torch.randn(world, BATCH, SEQ, HIDDEN, generator=g)


def run_case(rank: int, world: int, ep: int, etp: int, dispatcher: str, mode: str, starved: bool) -> dict:
    layout = Layout(dp=world, ep=ep, etp=etp, edp=world // (ep * etp))
    members = bind_layout(layout).members
    options = MoEOptions(dispatcher=dispatcher, **MODES[mode])
    ref = reference_block(options, starved)
    x, g = inputs(world, starved)
    grid = ExpertGrid(SPEC.experts, ep, etp, members["ep"].index(rank), members["etp"].index(rank))
    mine = ExpertParallelMoE.from_reference(ref, grid, options)
    xr = x.clone().requires_grad_()
    ref_out = torch.stack([ref(xr[r]) for r in range(world)])
    (ref_out * g).sum().backward()
    xm = x[rank].clone().requires_grad_()
    with comm.counting() as sent:
        out = mine(xm)
        (out * g[rank]).sum().backward()
    errs = {"out": max_err(out, ref_out[rank]), "dx": max_err(xm.grad, xr.grad[rank])}
    errs.update(grad_errors(mine, ref, grid))
    errs["dropped"] = dropped(ref, x[rank], options)
    errs["bytes"] = sent.total()
    return errs


def grad_errors(mine: ExpertParallelMoE, ref: MoEBlock, grid: ExpertGrid) -> dict:
    out = {}
    for name, p in mine.named_parameters():
        grad = p.grad.clone()
        if mine.grad_groups()[name] == "expert":
            grad = comm.all_reduce_sum(grad, "edp")
        else:
            grad = comm.all_reduce_sum(grad, "dp")
        want = ref.get_parameter(name).grad
        if name.startswith("experts."):
            up, down = shard_experts(ref.experts.w_gate_up.grad, ref.experts.w_down.grad, grid, True)
            want = up if name.endswith("w_gate_up") else down
        out[f"grad {name}"] = max_err(grad, want)
    return out


def dropped(ref: MoEBlock, x: torch.Tensor, options: MoEOptions) -> int:
    if options.capacity_factor is None:
        return 0
    flat = x.reshape(-1, HIDDEN)
    w, i, _ = routing.route(ref.router(flat.float()), None, top_k=2, router="softmax", pre_softmax=False,
                            norm_topk=True, groups=1, topk_groups=1, scaling_factor=1.0)
    keep = routing.capacity_keep(w, i, SPEC.experts, options.capacity_factor, options.drop_policy)
    return int((~keep).sum())


def run_cases(rank: int, world: int, cases: dict) -> dict:
    return {name: run_case(rank, world, *args) for name, args in cases.items()}


def cases_for(layouts: list[tuple[int, int]], modes) -> dict:
    out = {}
    for ep, etp in layouts:
        for dispatcher in ("alltoall", "allgather"):
            for mode in modes:
                out[f"ep{ep}-etp{etp}-{dispatcher}-{mode}"] = (ep, etp, dispatcher, mode, False)
            out[f"ep{ep}-etp{etp}-{dispatcher}-starved"] = (ep, etp, dispatcher, "dropless", True)
            out[f"ep{ep}-etp{etp}-{dispatcher}-starved-cap-pad"] = (ep, etp, dispatcher, "cap-pad", True)
    return out


CASES_2 = cases_for([(2, 1)], MODES)
CASES_4 = cases_for([(4, 1), (2, 2)], ("dropless", "cap-probs", "cap-position", "cap-pad"))


def check(results: list[dict], case: str, mode: str) -> None:
    for rank, res in enumerate(results):
        errs = res[case]
        for what, err in errs.items():
            if what not in ("dropped", "bytes"):
                assert err <= 1e-5, f"rank {rank} {case}: {what} differs by {err:.3g}"
    if mode.startswith("cap") and "starved" not in case:
        assert sum(r[case]["dropped"] for r in results) > 0, "the capacity factor must drop tokens"
    assert sum(r[case]["bytes"] for r in results) > 0, "tokens must cross ranks"


class TestTwoRanks:
    @pytest.fixture(scope="class")
    @classmethod
    def results(cls):
        return spawn(run_cases, 2, CASES_2)

    @pytest.mark.parametrize("case", sorted(CASES_2))
    def test_case_matches_reference(self, results, case):
        check(results, case, CASES_2[case][3])


class TestFourRanks:
    @pytest.fixture(scope="class")
    @classmethod
    def results(cls):
        return spawn(run_cases, 4, CASES_4)

    @pytest.mark.parametrize("case", sorted(CASES_4))
    def test_case_matches_reference(self, results, case):
        check(results, case, CASES_4[case][3])
