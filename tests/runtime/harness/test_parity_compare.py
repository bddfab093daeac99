"""The parity comparer (runtime/harness/parity_compare.py) without processes: records of an expert-parallel
layout (EP x ETP pieces, EDP replicas, DP replicas of dense tensors) reassemble into the reference's
shapes, and a wrong piece or a missing bias layer is reported, not hidden."""
import pytest
import torch

from plait.lowering.moe.dispatch import ExpertGrid
from plait.lowering.moe.sync import ExpertSync, expert_slices, take
from plait.runtime.harness.parity_compare import assemble, compare

EXPERTS, FFN, HIDDEN = 4, 6, 3
NAMES = ("layers.0.mixer.experts.w_gate_up", "layers.0.mixer.experts.w_down")


def _reference() -> dict:
    g = torch.Generator().manual_seed(0)  # values below 1: differences are absolute
    return {"embed.weight": torch.rand(5, HIDDEN, generator=g),
            NAMES[0]: torch.rand(EXPERTS, 2 * FFN, HIDDEN, generator=g),
            NAMES[1]: torch.rand(EXPERTS, HIDDEN, FFN, generator=g)}


def _records(ref: dict, ep: int, etp: int, edp: int, biases=None) -> list[dict]:
    """One record per rank of an (etp, ep, edp) expert grid; dense tensors are whole on every rank
    (no TP), and DP coordinates follow EDP's so that both replica kinds appear."""
    out = []
    for e in range(edp):
        for p in range(ep):
            for t in range(etp):
                sync = ExpertSync(params=NAMES, grid=ExpertGrid(EXPERTS, ep, etp, p, t), edp=edp)
                tensors = {n: take(ref[n], expert_slices(sync.grid, n, tuple(ref[n].shape), True))
                           for n in NAMES}
                tensors["embed.weight"] = ref["embed.weight"]
                out.append({"loss": 1.0, "grads": dict(tensors), "params": tensors, "shards": {},
                            "experts": sync, "coords": {"dp": e, "edp": e},
                            "biases": biases or {}})
    return out


@pytest.mark.parametrize("ep,etp,edp", [(2, 1, 1), (4, 1, 2), (2, 2, 1), (1, 2, 2)])
def test_expert_pieces_reassemble_into_the_reference(ep, etp, edp):
    ref = _reference()
    whole = assemble(_records(ref, ep, etp, edp), "params")
    assert set(whole) == set(ref)
    assert all(torch.equal(whole[n], ref[n]) for n in ref)
    err = compare(_records(ref, ep, etp, edp), {"loss": 1.0, "grads": ref, "params": ref})
    assert err.max == 0.0


def test_a_wrong_piece_is_measured_and_named():
    ref = _reference()
    records = _records(ref, 2, 2, 1)
    records[3]["params"][NAMES[1]] = records[3]["params"][NAMES[1]] + 0.5
    err = compare(records, {"loss": 1.0, "grads": ref, "params": ref})
    assert err.params == pytest.approx(0.5) and err.worst_param == NAMES[1] and err.grads == 0.0


def test_expert_biases_are_compared_on_every_rank_and_every_layer_must_be_seen():
    ref = _reference()
    want = {0: torch.tensor([0.1, -0.1, 0.0, 0.05])}
    good = _records(ref, 2, 1, 1, biases={0: want[0].clone()})
    assert compare(good, {"loss": 1.0, "grads": ref, "params": ref, "biases": want}).biases == 0.0
    good[1]["biases"] = {0: want[0] + 1e-3}
    assert compare(good, {"loss": 1.0, "grads": ref, "params": ref, "biases": want}).biases \
        == pytest.approx(1e-3, rel=1e-4)
    with pytest.raises(AssertionError, match="layers \\[1\\] missing"):
        compare(good, {"loss": 1.0, "grads": ref, "params": ref, "biases": {**want, 1: want[0]}})


def test_a_shape_mismatch_is_an_assertion_not_a_crash():
    ref = _reference()
    records = _records(ref, 2, 1, 1)
    for rec in records:  # as if the comparer did not know the experts were sharded
        rec["experts"] = ExpertSync()
    with pytest.raises(AssertionError, match="reassembled"):
        compare(records, {"loss": 1.0, "grads": ref, "params": ref})
