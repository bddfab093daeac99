"""The parity comparer: every rank's record of a parallel run reassembled into whole tensors and
measured against the single-device reference (`runtime.harness.parity`).

A record (one per rank, written by `parity.record_run`) holds the step-0 loss and reduced
gradients, the parameters and expert biases after the last step, and the facts needed to put
pieces back together: the TP `ShardSpec`s, the rank's dense coordinates, its expert coordinates
(`ExpertSync`: which parameters are experts and which (EP, ETP) piece this rank holds) and its EDP
index. Dense tensors come from DP rank 0 (TP pieces in index order), expert tensors from EDP rank 0
(one piece per (EP, ETP) coordinate, `ExpertSync.assemble`), so every layout, dense or
expert-parallel, compares against the reference's shapes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Errors:
    loss: float
    grads: float
    params: float
    worst_grad: str = ""
    worst_param: str = ""
    copies: float = 0.0  # largest difference between copies of one tensor (tied embeddings)
    biases: float = 0.0  # largest difference of any rank's expert-bias (MoE aux-loss-free balancing)

    @property
    def max(self) -> float:
        return max(self.loss, self.grads, self.params, self.copies, self.biases)


def placement(program, mesh) -> dict:
    """Where a rank's tensors belong, saved next to them for `assemble`: its TP shard specs, its
    expert coordinates and its dense (and EDP) coordinates."""
    experts = program.experts
    return {"shards": dict(program.shards), "experts": experts,
            "coords": dict(program.coords, edp=mesh.coord("edp") if experts.params else 0)}


def assemble(records: list[dict], key: str) -> dict[str, torch.Tensor]:
    """Whole tensors of ``key`` ("grads" or "params"): TP shards from DP rank 0 reassembled by
    their ShardSpec (which knows segmented splits such as Mamba's in_proj), expert shards from EDP
    rank 0 reassembled over EP x ETP."""
    dense: dict[str, dict[int, torch.Tensor]] = {}
    experts: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
    specs, syncs = {}, {}
    for rec in records:
        sync = rec["experts"]
        for name, tensor in rec[key].items():
            if name in sync.params:
                if rec["coords"]["edp"] == 0:
                    experts.setdefault(name, {})[(sync.grid.ep_rank, sync.grid.etp_rank)] = tensor
                    syncs[name] = sync
            elif rec["coords"]["dp"] == 0:
                spec = rec["shards"].get(name)
                dense.setdefault(name, {})[spec.index if spec else 0] = tensor
                specs[name] = spec
    whole = {n: specs[n].assemble([p[i] for i in sorted(p)]) if specs[n] else p[0]
             for n, p in dense.items()}
    whole.update({n: syncs[n].assemble(n, p) for n, p in experts.items()})
    return whole


def difference(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference, relative to the reference's scale where that exceeds 1 (fp32
    sums of many O(1) gradient terms round at ~1e-7 of their size, not of 1)."""
    if got.shape != want.shape:
        raise AssertionError(f"shape {tuple(got.shape)} reassembled, the reference has "
                             f"{tuple(want.shape)}")
    if not want.numel():
        return 0.0
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / max(1.0, float(want.abs().max())))


def _max_diff(got: dict, want: dict) -> tuple[float, str]:
    missing = sorted(set(want) - set(got))
    if missing:
        raise AssertionError(f"parameters missing from the parallel run: {missing}")
    diffs = {n: difference(got[n], want[n]) for n in want}
    worst = max(diffs, key=diffs.get)
    return diffs[worst], worst


def _copy_diff(records: list[dict], key: str) -> float:
    """The first and last stage's copies of a tied embedding (each TP piece) must agree."""
    seen: dict[tuple[str, int], torch.Tensor] = {}
    worst = 0.0
    for rec in records:
        for name in rec.get("tied", ()):
            tensor = rec[key][name]
            spec = rec["shards"].get(name)
            piece = (name, spec.index if spec else 0)
            if piece in seen:
                worst = max(worst, (seen[piece] - tensor).abs().max().item())
            seen.setdefault(piece, tensor)
    return worst


def _bias_diff(records: list[dict], want: dict[int, torch.Tensor]) -> float:
    """Every rank's bias of every MoE layer it runs against the reference's; every reference
    layer must be run somewhere."""
    seen, worst = set(), 0.0
    for rank, rec in enumerate(records):
        for layer, bias in rec.get("biases", {}).items():
            if layer not in want:
                raise AssertionError(f"rank {rank} has an expert bias in layer {layer}, "
                                     f"the reference has none")
            worst = max(worst, (bias.double() - want[layer].double()).abs().max().item())
            seen.add(layer)
    if seen != set(want):
        raise AssertionError(f"expert biases of layers {sorted(set(want) - seen)} missing")
    return worst


def compare(records: list[dict], ref: dict) -> Errors:
    grad_err, worst = _max_diff(assemble(records, "grads"), ref["grads"])
    param_err, worst_param = _max_diff(assemble(records, "params"), ref["params"])
    return Errors(loss=max(abs(r["loss"] - ref["loss"]) for r in records), grads=grad_err,
                  params=param_err, worst_grad=worst, worst_param=worst_param,
                  copies=max(_copy_diff(records, "params"), _copy_diff(records, "grads")),
                  biases=_bias_diff(records, ref.get("biases", {})))
