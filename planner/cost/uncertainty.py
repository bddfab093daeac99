"""How sure a prediction is: the step time of a plan over the plausible range of every calibration
value it depends on, and which values move it most.

Each key's range depends on where its value came from:
  measured  `--calibration calib.json`: +-MEASURED_TOL of the value (a measurement's repeatability);
  spec      the device spec's `calibration { }` (fitted to published rows on the grid below): one
            grid step either side of the value, the fit's resolution (+-SPEC_TOL off the grid);
  default   planner/cost/context.py's value for a device nobody measured: the whole plausible
            range of GRID (the physically plausible candidates benchmarks/calibrate.py fits over)
            or, for keys never fitted, the range in RANGES with its source.
The plan's layout and stages are evaluated at each key's low and high end, one key at a time with
the rest as calibrated. Keys are taken as independent: the band is the point prediction minus /
plus the root-sum-square of the per-key one-sided deltas; the outer bound sets every key at its
slow (fast) end at once, the worst case. Only the winning plan is evaluated (2 per key + 3).
Not in the band: the datasheet peaks and link bandwidths, link latencies, host and launch
overhead (kernel_us, host_us_*, cp_host_us_*, shared_cores: 0 until measured, which dominates a
CPU device's tiny jobs), the stack facts (flash attention, K/V copies) and the memory keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from plait.ir import kinds
from plait.ir.job import TrainJob
from plait.ir.plan import ParallelPlan

from ..calibration import overridden
from ..layouts import units
from ..wording import seconds
from .context import Calibration, Context, layer_kinds
from .evaluate import evaluate
from .pipeline import CostTable

# parameter -> candidate values (physically plausible ranges; benchmarks/calibrate.py's fit grid,
# each key's default joins it there)
GRID = {
    "fsdp_eff": [0.4, 0.5, 0.6, 0.64, 0.68, 0.72, 0.76, 0.8, 0.9, 1.0],
    "a2a_eff": [0.3, 0.4, 0.5, 0.6, 0.8, 1.0],
    "inter_eff": [0.5, 0.6, 0.7, 0.8, 0.9],
    "intra_eff": [0.5, 0.6, 0.7, 0.8, 0.9],
    "gemm_eff": [0.6, 0.65, 0.7, 0.75, 0.8, 0.85],
    "gemm_knee": [64, 96, 128, 192, 256, 384],
    "attn_eff": [0.3, 0.4, 0.5, 0.6, 0.7],
    "hbm_eff": [0.6, 0.7, 0.8, 0.9],
}
# keys never fitted to published rows: (low, high, why)
RANGES = {
    "a2a_inter_eff": (min(GRID["a2a_eff"]), max(GRID["a2a_eff"]),
                      "the intra-node all-to-all's range (no inter-node measurement)"),
    # 1 hides the collective up to the compute's length; 0.5 is compute beside NCCL running twice
    # as slow: a bound chosen here, not measured, around Lee et al. 2025's mean of 18.9% slower
    # (0.84, the default) over A100 / H100 / MI250 / MI210
    **{f"overlap_{kind}": (0.5, 1.0, "compute up to 2x slower beside NCCL (Lee et al. 2025: "
                                     "1.19x on average)")
       for kind in ("all_gather", "reduce_scatter", "p2p", "fsdp")},
}
# a measured value: +-5%, ASSUMED for `plait calibrate`'s medians of repeated timings on a quiet
# machine (its run-to-run spread on a GPU is not measured yet). It does not hold on a busy host:
# three `plait calibrate local-cpu` runs on a shared 2-core CPU (load average 8-10) gave gemm_eff
# 0.38 / 0.51 / 0.87, attn_eff 0.27 / 0.07 / 0.08, intra_eff 0.093 / 0.093 / 0.159
MEASURED_TOL = 0.05
SPEC_TOL = 0.10  # a spec value off the fit grid: about one grid step (the grids step 5..15%)
# keys `plait calibrate` does not measure (a run's step times or a trained router pin them)
NOT_CALIBRATED = ("fsdp_eff", "moe_imbalance")
KEYS = (*GRID, *RANGES)  # and each layer kind's own (its cost facet's uncertain_ranges)
# every other key is a fraction of a peak: at most 1 (the all-to-all keys are ratios of two
# collectives' rates, which `plait calibrate` finds above 1 on some hosts)
UNBOUNDED = ("gemm_knee", "moe_imbalance", "a2a_eff", "a2a_inter_eff")


@dataclass(frozen=True)
class KeyDelta:
    key: str
    origin: str  # "measured" | "spec" | "default"
    value: float  # as the plan was evaluated (moe_imbalance 0: balanced random routing)
    low: float
    high: float
    fast: float  # step-time change (<= 0) at the end of the range that speeds the plan up
    slow: float  # step-time change (>= 0) at the end that slows it down
    why: str

    @property
    def swing(self) -> float:
        return self.slow - self.fast


@dataclass(frozen=True)
class Band:
    step: float
    low: float  # root-sum-square band
    high: float
    outer_low: float  # every key at its fast / slow end together
    outer_high: float
    keys: tuple[KeyDelta, ...]  # the keys that move the step, largest swing first

    def top(self, n: int = 3) -> tuple[str, ...]:
        return tuple(k.key for k in self.keys[:n])

    def unmeasured(self) -> int:
        return sum(k.origin != "measured" for k in self.keys)

    def line(self) -> str:
        """One sentence: the band, why it is that wide and what would narrow it."""
        span = f"{seconds(self.low)}–{seconds(self.high)} s"
        if not self.keys:
            return f"step {seconds(self.step)} s (no calibration value moves it)"
        n = self.unmeasured()
        what = (f"the range of {n} value{'s' * (n != 1)} nobody measured on this machine" if n
                else f"the tolerance of {len(self.keys)} measured values")
        top = self.top()
        fix = [k for k in top if k not in NOT_CALIBRATED and self._origin(k) != "measured"]
        hint = f" — `plait calibrate` measures {', '.join(fix)}" if fix else ""
        outer = f"{seconds(self.outer_low)}–{seconds(self.outer_high)} s"
        return (f"step {seconds(self.step)} s ({span}: {what}; most: {', '.join(top)}{hint}; "
                f"every value at one end at once {outer})")

    def _origin(self, key: str) -> str:
        return next(k.origin for k in self.keys if k.key == key)

    def to_dict(self) -> dict:
        return {"step_time": self.step, "low": self.low, "high": self.high,
                "outer_low": self.outer_low, "outer_high": self.outer_high,
                "combine": "root-sum-square of one-key deltas; outer: all keys at one end",
                "top": list(self.top()),
                "keys": [{"key": k.key, "origin": k.origin, "value": k.value, "low": k.low,
                          "high": k.high, "fast": k.fast, "slow": k.slow, "why": k.why}
                         for k in self.keys]}


def origin(key: str, spec: dict, measured: frozenset) -> str:
    return "measured" if key in measured else "spec" if key in spec else "default"


def key_range(key: str, value: float, where: str, own: dict) -> tuple[float, float, str]:
    """(low, high, why) of ``key`` whose value is ``value`` and came from ``where``; ``own``: the
    layer kinds' ranges of their own keys when unmeasured (cost facets' uncertain_ranges)."""
    top = math.inf if key in UNBOUNDED else max(1.0, value)
    if where == "default" and key in own:
        return own[key]
    floor = min(1.0, value) if key == "moe_imbalance" else 0.0  # the busiest holds >= the mean
    if where == "measured":
        return (max(floor, value * (1 - MEASURED_TOL)), min(top, value * (1 + MEASURED_TOL)),
                f"measured, +-{MEASURED_TOL:.0%}")
    if where == "spec":
        grid = sorted(GRID.get(key, ()))
        if value in grid:
            i = grid.index(value)
            return (grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)],
                    "device spec (fitted on a grid): one grid step either side")
        return (max(floor, value * (1 - SPEC_TOL)), min(top, value * (1 + SPEC_TOL)),
                f"device spec, +-{SPEC_TOL:.0%}")
    if key in GRID:
        return min(GRID[key]), max(GRID[key]), "plausible range (benchmarks/calibrate.py grid)"
    low, high, why = RANGES[key]
    return low, high, why


def step_time(job: TrainJob, plan: ParallelPlan, values: dict) -> float:
    """The plan's step time on ``job`` with ``values`` replacing calibration keys."""
    j = overridden(job, values)
    return evaluate(CostTable(j, plan.layout, units(j.model)), plan.stages).step_time


def band(job: TrainJob, plan: ParallelPlan, measured: frozenset = frozenset()) -> Band:
    """The step-time band of ``plan`` (made for ``job``, calibrated as it was planned);
    ``measured``: the keys a calibration file measured (calibration.measured_keys)."""
    spec, cal = dict(job.cluster.device.calibration), Calibration.of(job.cluster.device)
    # unset, the network's all-to-all follows a2a_eff: pin it so the two keys vary apart
    base = {"a2a_inter_eff": cal.a2a_inter_eff or cal.a2a_eff}
    t0 = step_time(job, plan, base)
    ctx = Context(job, plan.layout)
    own = {}
    for kind in layer_kinds(job.model):
        own.update(kinds.facet(kind, "cost").uncertain_ranges(ctx))
    deltas, slow_end, fast_end = [], {}, {}
    for key in (*KEYS, *sorted(own)):
        where = origin(key, spec, measured)
        value = base.get(key, getattr(cal, key))
        low, high, why = key_range(key, value, where, own)
        times = {end: step_time(job, plan, {**base, key: end}) - t0 for end in (low, high)}
        fast, slow = min(0.0, *times.values()), max(0.0, *times.values())
        if slow - fast <= 1e-9 * t0:
            continue
        deltas.append(KeyDelta(key, where, value, low, high, fast, slow, why))
        slow_end[key] = max(times, key=times.get)
        fast_end[key] = min(times, key=times.get)
    deltas.sort(key=lambda d: (-d.swing, d.key))
    return Band(step=t0, low=t0 - math.sqrt(sum(d.fast ** 2 for d in deltas)),
                high=t0 + math.sqrt(sum(d.slow ** 2 for d in deltas)),
                outer_low=min(t0, step_time(job, plan, {**base, **fast_end})),
                outer_high=max(t0, step_time(job, plan, {**base, **slow_end})),
                keys=tuple(deltas))
