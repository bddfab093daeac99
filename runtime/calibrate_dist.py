"""Importance calibration over several local processes, data parallel: rank r scores calibration
batches r, r + n, ... on its replica of the reference model (forward hooks,
lowering/prune/importance.py), and the additive accumulators (sums of squares, cosine sums, token
counts, skipped-layer losses) are all-reduced, so every rank ends with the scores of all batches.

Only the batches are split: each rank holds the whole model. Calibrating a model too large for one
device (hooks on TP / PP-sharded compiled programs) is not done here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
import torch.distributed as dist

from plait.ir.model import ModelSpec
from plait.lowering.build import build_model
from plait.lowering.prune.importance import activation_scores
from plait.runtime.spawn import start_ranks
from plait.planner.prune.scores import ImportanceScores

from .mesh import destroy, init_distributed


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    out = t.clone()
    dist.all_reduce(out)
    return out


def _worker(rank: int, world: int, spec: ModelSpec, state, batches: list[torch.Tensor], depth: str,
            work: str, timeout_s: float) -> None:
    torch.set_num_threads(1)
    init_distributed("gloo", timeout_s, f"file://{work}/calibrate-rendezvous", rank, world)
    try:
        model = build_model(spec)
        model.load_state_dict(state, strict=True)
        scores = activation_scores(model, spec, batches[rank::world], depth, reduce=_sum_over_ranks)
        if rank == 0:
            (Path(work) / "calibrate.json").write_text(scores.to_json())
    finally:
        destroy()


def calibrate_parallel(spec: ModelSpec, state: Mapping[str, torch.Tensor], batches: list[torch.Tensor],
                       ranks: int, work: str | Path, depth: str = "cosine",
                       timeout_s: float = 300) -> ImportanceScores:
    """Activation scores of ``spec`` with weights ``state`` over ``batches``, on ``ranks`` local
    processes (at most one per batch)."""
    world = max(1, min(ranks, len(batches)))
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "calibrate-rendezvous").unlink(missing_ok=True)
    start_ranks(_worker, (world, spec, dict(state), batches, depth, str(work), timeout_s), world)
    return ImportanceScores.from_json((work / "calibrate.json").read_text())
