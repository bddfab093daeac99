"""Training throughput of pruned candidates through the planner's cost model.

The prune job's `train` setup (cluster, batch, sequence length, precision, layout pins) is planned
once for the source model; its best layout is then held fixed. For the ILP, each layer's time per
micro-batch under that layout (the cost model's unit time) is a linear cost, and the step time is
approximated as

    step ~ ratio * (m + (pp - 1) / vpp) / pp * (sum of layer times + embedding + head)

with ``ratio`` calibrated so the source model's approximation equals its planned step time. Chosen
candidates are then planned for real (stage partition, recompute, data-parallel sync) under the same
layout, and a candidate that misses the target is cut from the ILP.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from plait.ir.errors import PlaitError
from plait.ir.job import TrainJob
from plait.ir.model import ModelSpec
from plait.ir.plan import Layout, ParallelPlan

from ..cost.context import Context
from ..cost.pipeline import OPTIONS, CostTable, build_unit
from ..search import estimate

PINNED = ("tp", "cp", "pp", "vpp", "ep", "etp", "mbs", "dp_kind")


@dataclass(frozen=True)
class Prediction:
    tokens_per_s: float
    layout: str


class ThroughputModel:
    def __init__(self, train: TrainJob, model: ModelSpec):
        self.job = replace(train, model=model)
        self.plan: ParallelPlan = estimate(self.job, {})  # the train job's own pins apply
        self.layout: Layout = self.plan.layout
        self.option = OPTIONS.index(self.layout.recompute)
        self.pins = {k: getattr(self.layout, k) for k in PINNED}
        self.ratio = 1.0
        self.ratio = self.plan.prediction.step_time / self.step_estimate(model)

    def _job(self, spec: ModelSpec) -> TrainJob:
        return replace(self.job, model=spec)

    def layer_time(self, one_layer: ModelSpec, kind: str) -> float:
        """Seconds per micro-batch of one ``kind`` layer under the fixed layout."""
        return build_unit(Context(self._job(one_layer), self.layout), (kind,)).time(self.option)

    def extra_time(self, spec: ModelSpec) -> float:
        """Embedding + head seconds per micro-batch."""
        table = CostTable(self._job(replace(spec, layers=spec.layers[:1])), self.layout, (spec.layers[:1],))
        return table.first.time + table.last.time

    @property
    def seconds_factor(self) -> float:
        """Step seconds per surrogate second (sum of layer and extra times per micro-batch)."""
        lay = self.layout
        m = self.plan.num_microbatches
        return self.ratio * (m + (lay.pp - 1) / lay.vpp) / lay.pp

    def step_estimate(self, spec: ModelSpec) -> float:
        per_kind = {k: self.layer_time(replace(spec, layers=(k,)), k) for k in set(spec.layers)}
        return self.seconds_factor * (sum(per_kind[k] for k in spec.layers) + self.extra_time(spec))

    def budget_seconds(self, tokens_per_s: float) -> float:
        """The surrogate-seconds budget of a throughput target."""
        step = self.job.global_batch * self.job.seq_len / tokens_per_s
        return step / self.seconds_factor

    def predict(self, spec: ModelSpec) -> Optional[Prediction]:
        """The planner's throughput for ``spec`` under the fixed layout; None when it cannot run."""
        try:
            plan = estimate(self._job(spec), dict(self.pins))
        except PlaitError:
            return None
        return Prediction(plan.prediction.tokens_per_s, plan.layout.short())

