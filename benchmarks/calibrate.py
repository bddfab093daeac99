"""Fit cost-model calibration values to reference rows (used by `benchmarks/fidelity.py`).

The fit, and why each rule (issue #17: the leave-one-table-out column swung between 3.6% and 18%
with the local optimum a one-start coordinate descent happened to land in):

1. Global optimum on the grid, deterministically. Coordinate descent (the layout knobs each row's
   search picked are frozen, recompute stays open) from STARTS points: the anchor (below) and
   STARTS - 1 grid points drawn by ``random.Random(SEED)``. Every evaluated point is kept. The
   objective is piecewise linear in the keys (mean |error|) and descents stall at its kinks, so
   this is the best of the starts, not a proof of the grid's minimum: other seeds / 12 starts
   found bests up to 0.0017 apart on the dense and Mixtral rows (less than TOL), and moved
   fidelity.py's held-out columns by at most 0.1 point.
2. Flatness is stated, not hidden. The NEAR-OPTIMAL SET is every evaluated point whose objective
   is within TOL (half a point of mean |error|) of the best: the rows cannot tell those fits
   apart. It is grown from the descents' end points one grid step at a time (up to FLOOD points
   expanded), so it covers the flat region around them, not just where the descents stopped.
   The fit takes the one closest (in grid steps) to the ANCHOR: the physical defaults of
   planner/cost/context.py plus the rows' STACK facts, never the device spec's shipped values
   (fitted to these rows); then it reverts, key by key, every value whose revert stays within
   TOL of the best, so a key the rows do not exercise keeps its default. Per key the report
   says: IDENTIFIED (no near-optimal fit has the default: the rows alone move it), DEFAULT KEPT,
   or ON A RIDGE (moved, but some near-optimal fit has the default: only a combination with
   other keys is determined), with its range over the near-optimal set. A held-out prediction is made with the chosen fit
   and with the near-optimal fits at each key's extremes: their spread is its uncertainty band.
3. Only what is physics of the same thing transfers. Keys fall in classes:
     STACK     facts of the measured software stack, never fitted (flash attention or not, how
               the attention kernel keeps K/V, allocator reserve);
     KERNEL    rates a device spec takes from published kernel micro-benchmarks (the attention
               core on Hopper: cuDNN fused attention, benchmarks/attention_kernels.py): facts of
               the device and its kernels like the STACK's, never fitted where the spec has them
               (a device without them fits attn_eff on flash-attention rows);
     DEVICE    rates of one chip, its kernel library and its links (gemm_eff, gemm_knee,
               attn_eff, intra_eff, inter_eff, a2a_eff): an H100 fit says nothing about an A100
               (cuBLAS reaches a larger share of an A100's peak than of an H100's), so they
               transfer only to rows of the same device and stack;
     SCHEDULE  how the software schedules communication (fsdp_eff: per-layer gathers against a
               bucketed collective): transfer to rows of the same stack (same STACK facts), any
               device;
     MEMORY    hbm_eff, the share of HBM bandwidth streaming kernels reach (DRAM physics):
               transfers to any device.
   When every fitted key may transfer, the whole fit does (a ridge moves with its partners); else
   only the IDENTIFIED keys of the transferable classes (a ridge key without its partners means
   nothing). A key a transfer does not carry stays at the target device's physical default.
Never fitted either: how much of a collective compute beside it hides (overlap_all_gather,
overlap_reduce_scatter, overlap_all_to_all, overlap_p2p): `plait calibrate` measures it on the
machines, and a device nobody measured keeps the literature default of planner/cost/context.py.

No peeking: a fit reads only the rows it is given; its anchor is the defaults and the training
rows' stack facts; a transfer reads the target rows' stack facts and device name only.

    .venv/bin/python benchmarks/fidelity.py --fit a100-sxm4-80gb   # prints a calibration block
"""
from __future__ import annotations

import dataclasses
import random

from plait.planner.cost.context import Calibration
from plait.planner.cost.uncertainty import GRID  # the plausible values (each default joins them)

STACK = ("flash_attention", "kv_expanded", "reserve_gib", "fragmentation")
KERNEL = ("attn_eff", "attn_knee", "attn_bwd_ratio", "scan_eff")
DEVICE = ("gemm_eff", "gemm_knee", "attn_eff", "intra_eff", "inter_eff", "a2a_eff")
SCHEDULE = ("fsdp_eff",)
MEMORY = ("hbm_eff",)
DENSE_ONLY = ("gemm_eff", "gemm_knee", "hbm_eff", "intra_eff", "inter_eff")
# The MoE table (10 rows, two models) fits only its communication: what no kernel micro-benchmark
# or datasheet supplies, the links' achieved share at the message sizes training sends (intra_eff,
# inter_eff, a2a_eff) and the measured stack's FSDP efficiency. Its GEMM, attention and HBM rates
# keep their kernel-benchmark / default values (the H100 spec names each source). Measured when
# this rule came in (benchmarks/fidelity.py, leave-one-model-out: fit on one model's rows,
# predict the other's): fitting all nine keys put the held-out Megatron-Core rows (tp_ep_dp,
# mcore, folding) 8.9% mean off, these four 5.0%; the two nine-key fits disagreed on gemm_eff
# (0.70 vs 0.85), so a fit of the compute rates learns the table, not the machine.
MOE_FITTED = ("fsdp_eff", "intra_eff", "inter_eff", "a2a_eff")
TOL = 0.005  # objective units (mean |error| plus penalties): fits closer than this are ties
STARTS = 6
FLOOD = 150  # most near-optimal points whose neighbours a fit evaluates
SEED = 17
DEFAULTS = Calibration()


def frozen_pins(row, layout) -> list[dict]:
    keep = {k: getattr(layout, k) for k in ("tp", "cp", "pp", "vpp", "ep", "etp", "mbs", "sp",
                                             "dp_kind")}
    return [{**row.pins[0], **keep}]


def order_margin_penalty(results, margin: float = 0.03) -> float:
    """Published neighbours (a below b) should be predicted at least ``margin`` apart, in order."""
    penalty = 0.0
    for group in {r.group for r, _, _ in results if r.group}:
        mine = sorted(((r.published, p) for r, p, _ in results if r.group == group))
        for (_, low), (_, high) in zip(mine, mine[1:]):
            penalty += max(0.0, margin - (high / low - 1))
    return penalty


def objective(results, summarize) -> float:
    mean, worst = summarize(results)
    return mean + 2 * max(0.0, worst - 0.15) + order_margin_penalty(results)


def stack_facts(rows) -> dict:
    """The STACK keys of the rows' device spec (the software the rows were measured with)."""
    return {k: v for k, v in rows[0].job.cluster.device.calibration if k in STACK}


def kernel_facts(rows) -> dict:
    """The KERNEL keys of the rows' device spec (kernel micro-benchmarks, never fitted)."""
    return {k: v for k, v in rows[0].job.cluster.device.calibration if k in KERNEL}


def facts(rows) -> dict:
    """What a fit anchors at and a prediction of ``rows`` always keeps: the stack's facts and
    the kernels' measured rates."""
    return {**stack_facts(rows), **kernel_facts(rows)}


def params_for(rows) -> tuple[str, ...]:
    """Keys these rows can inform: dense rows never exercise the MoE keys, nor the flash
    attention core when their stack materialised the scores. The MoE rows fit MOE_FITTED only."""
    moe = any(r.metric == "mfu" for r in rows)
    keys = MOE_FITTED if moe else DENSE_ONLY
    if stack_facts(rows).get("flash_attention", 1.0) < 0.5:
        keys = tuple(k for k in keys if k != "attn_eff")
    return tuple(k for k in keys if k not in kernel_facts(rows))


@dataclasses.dataclass(frozen=True)
class Fit:
    """A fit's chosen values, and what the rows could not tell apart from them."""

    values: dict  # the anchor updated by the chosen value of every parameter
    anchor: dict  # what a parameter the rows do not identify keeps
    params: tuple[str, ...]
    score: float  # objective of ``values``
    best: float  # lowest objective evaluated
    near: tuple[dict, ...]  # the near-optimal set: evaluated values within TOL of ``best``

    def default(self, key: str) -> float:
        return float(self.anchor.get(key, getattr(DEFAULTS, key)))

    def identified(self) -> tuple[str, ...]:
        """Parameters no near-optimal fit leaves at the default: the rows alone move them."""
        return tuple(k for k in self.params
                     if not self.spread(k)[0] <= self.default(k) <= self.spread(k)[1])

    def spread(self, key: str) -> tuple[float, float]:
        seen = [v[key] for v in self.near]
        return min(seen), max(seen)

    def extremes(self) -> list[dict]:
        """The near-optimal fits holding each parameter's lowest and highest value (deduped, in
        a fixed order): where a held-out prediction's band comes from."""
        out = [self.values]
        for key in self.params:
            for pick in (min, max):
                v = pick(self.near, key=lambda fit: (fit[key], sorted(fit.items())))
                if v not in out:
                    out.append(v)
        return out


def _grids(params, anchor) -> dict:
    return {k: sorted(set(GRID[k]) | {float(anchor.get(k, getattr(DEFAULTS, k)))})
            for k in params}


def _starts(grids: dict, home: tuple) -> list[tuple]:
    rng = random.Random(SEED)
    starts = [home]
    while len(starts) < STARTS:
        starts.append(tuple(rng.choice(g) for g in grids.values()))
    return starts


def _descend(point: tuple, grids: dict, score, rounds: int = 6) -> tuple:
    """Coordinate descent from ``point`` until a round moves nothing (``score`` caches); the last
    round evaluates every one-key neighbour of the end point, so its 1-D slices join the cache."""
    for _ in range(rounds):
        moved = False
        for i, values in enumerate(grids.values()):
            for value in values:
                trial = point[:i] + (value,) + point[i + 1:]
                if score(trial) < score(point) - 1e-9:
                    point, moved = trial, True
        if not moved:
            break
    return point


def _neighbours(point: tuple, grids: dict):
    """The points one grid step away in one key."""
    for i, values in enumerate(grids.values()):
        at = values.index(point[i])
        for j in (at - 1, at + 1):
            if 0 <= j < len(values):
                yield point[:i] + (values[j],) + point[i + 1:]


def _flood(seeds: list[tuple], grids: dict, score, cache: dict, limit: int = FLOOD) -> None:
    """Grow the near-optimal set from ``seeds`` one grid step at a time (a point joins while it
    is within TOL of the best so far), in a fixed order, until it stops growing or ``limit``
    points were expanded: the region the rows cannot tell apart, not just where descents ended."""
    queue, expanded = sorted(seeds), set()
    while queue and len(expanded) < limit:
        point = queue.pop(0)
        if point in expanded or score(point) > min(cache.values()) + TOL:
            continue
        expanded.add(point)
        queue.extend(q for q in _neighbours(point, grids) if q not in expanded
                     and score(q) <= min(cache.values()) + TOL)


def _distance(point: tuple, home: tuple, grids: dict) -> int:
    """Grid steps between ``point`` and ``home``."""
    return sum(abs(g.index(a) - g.index(b)) for a, b, g in zip(point, home, grids.values()))


def _pull_home(point: tuple, home: tuple, score, best: float) -> tuple:
    """Revert each parameter to ``home`` (in parameter order) while the fit stays within TOL of
    ``best``: a parameter the rows do not feel goes back to its default."""
    for i, value in enumerate(home):
        trial = point[:i] + (value,) + point[i + 1:]
        if trial != point and score(trial) <= best + TOL:
            point = trial
    return point


def fit_rows(rows, run_rows, summarize, anchor: dict, params=None, log=print) -> Fit:
    """The fit of ``params`` (default params_for) to ``rows``, anchored at ``anchor``."""
    params = tuple(params or params_for(rows))
    first = run_rows(rows, anchor)
    frozen = [dataclasses.replace(r, pins=frozen_pins(r, lay)) for r, _, lay in first if lay]
    grids = _grids(params, anchor)
    cache: dict[tuple, float] = {}

    def as_values(point: tuple) -> dict:
        return {**anchor, **dict(zip(params, point))}

    def score(point: tuple) -> float:
        if point not in cache:
            cache[point] = objective(run_rows(frozen, as_values(point)), summarize)
        return cache[point]

    def near() -> list[tuple]:
        best = min(cache.values())
        return sorted(p for p, s in cache.items() if s <= best + TOL)

    home = tuple(float(anchor.get(k, getattr(DEFAULTS, k))) for k in params)
    for start in _starts(grids, home):
        _descend(start, grids, score)
    closest = min(near(), key=lambda p: (_distance(p, home, grids), cache[p], p))
    chosen = _pull_home(closest, home, score, min(cache.values()))
    log(f"fit on {len(rows)} rows: {len(cache)} points evaluated, best {min(cache.values()):.4f}"
        f", {len(near())} within {TOL}, chosen {score(chosen):.4f}")
    return Fit(as_values(chosen), dict(anchor), params, score(chosen), min(cache.values()),
               tuple(as_values(p) for p in near()))


def fit_values(rows, run_rows, summarize, start: dict, params=None, log=print) -> dict:
    """Calibration values (``start`` updated) that minimise the objective on ``rows``."""
    return fit_rows(rows, run_rows, summarize, start, params, log).values


def transferable(train_rows, target_rows) -> tuple[str, ...]:
    """The key classes a fit on ``train_rows`` may carry to ``target_rows`` (see the module)."""
    same_device = (train_rows[0].job.cluster.device.name
                   == target_rows[0].job.cluster.device.name)
    same_stack = stack_facts(train_rows) == stack_facts(target_rows)
    return MEMORY + (SCHEDULE if same_stack else ()) + (DEVICE if same_device and same_stack
                                                        else ())


def carried(fit: Fit, train_rows, target_rows) -> tuple[str, ...]:
    """The parameters of ``fit`` a transfer to ``target_rows`` carries: all of them when every
    one is transferable (a ridge moves with its partners); else the transferable ones the rows
    identify alone (a ridge key without its partners would mean nothing)."""
    keys = transferable(train_rows, target_rows)
    if all(k in keys for k in fit.params):
        return fit.params
    return tuple(k for k in fit.identified() if k in keys)


def transfer(values: dict, keys: tuple[str, ...], target_rows) -> dict:
    """``values``' ``keys`` over ``target_rows``' own STACK and KERNEL facts; the rest at the
    defaults."""
    return {**facts(target_rows), **{k: values[k] for k in keys}}


def report(fit: Fit, moved_keys: tuple[str, ...] | None = None) -> list[str]:
    """One line per parameter: value, default, range over the near-optimal set, whether the rows
    identify it and (given the ``moved_keys`` a transfer carries) whether it transfers."""
    lines = [f"  objective {fit.score:.4f} (best {fit.best:.4f}; {len(fit.near)} fits within "
             f"{TOL})"]
    for key in fit.params:
        low, high = fit.spread(key)
        status = ("identified" if key in fit.identified() else "default kept"
                  if fit.values[key] == fit.default(key) else "on a ridge (not identified alone)")
        moved = "" if moved_keys is None else (", transferred" if key in moved_keys
                                            else ", not transferred")
        lines.append(f"    {key:<10} {fit.values[key]:<6g} default {fit.default(key):<6g} "
                     f"near-optimal {low:g}..{high:g}  {status}{moved}")
    return lines


def fit(device: str, rows, run_rows, summarize, order_ok) -> dict:
    """Re-fit ``device`` on its rows, anchored at the physical defaults and its spec's keys that
    are not fitted (stack facts, measured values, kernel micro-benchmarks); prints the block to
    paste."""
    anchor = {k: v for k, v in rows[0].job.cluster.device.calibration
              if k not in GRID or k in KERNEL}
    result = fit_rows(rows, run_rows, summarize, anchor)
    print("\n".join(report(result)))
    final = run_rows(rows, result.values)
    mean, worst = summarize(final)
    print(f"fitted (full search): mean {mean:.1%} max {worst:.1%}")
    body = "\n".join(f"    {k} = {v:g}" for k, v in sorted(result.values.items()))
    print(f"  calibration {{\n{body}\n  }}")
    return result.values
