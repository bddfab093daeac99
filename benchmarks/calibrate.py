"""Fit cost-model calibration values to reference rows (used by `benchmarks/fidelity.py`).

Coordinate descent over a few physical efficiencies; the layout knobs each row's search picked are
frozen during the fit (recompute stays open), then the full search re-checks the fitted values.

Keys fall in three classes, which decides what a fit on one table may say about another:
  STACK   facts of the measured software stack, never fitted (flash attention or not, how the
          attention kernel keeps K/V, allocator reserve);
  SHARED  efficiencies every model exercises (GEMMs, HBM, links, overlap, attention core): a fit
          on dense rows transfers to MoE rows and back;
  MOE     what only MoE / FSDP rows exercise (all-to-all, FSDP gathers): a dense table cannot
          fit them, so a transfer from it keeps the physical defaults of planner/cost/context.py.
Never fitted either: how much of a collective compute beside it hides (overlap_all_gather,
overlap_reduce_scatter, overlap_all_to_all): `plait calibrate` measures it on the machines, and a
device nobody measured keeps the literature default of planner/cost/context.py.

    .venv/bin/python benchmarks/fidelity.py --fit a100-sxm4-80gb   # prints a calibration block
"""
from __future__ import annotations

import dataclasses

# parameter -> candidate values (physically plausible ranges)
GRID = {
    "fsdp_eff": [0.4, 0.5, 0.6, 0.64, 0.68, 0.72, 0.76, 0.8, 0.9, 1.0],
    "a2a_eff": [0.3, 0.4, 0.5, 0.6, 0.8, 1.0],
    "inter_eff": [0.5, 0.6, 0.7, 0.8, 0.9],
    "intra_eff": [0.5, 0.6, 0.7, 0.8, 0.9],
    "gemm_eff": [0.6, 0.65, 0.7, 0.75, 0.8, 0.85],
    "gemm_knee": [64, 96, 128, 192, 256, 384],
    "attn_eff": [0.3, 0.4, 0.5, 0.6, 0.7],
    "hbm_eff": [0.6, 0.7, 0.8, 0.9],
    "overlap": [0.5, 0.7, 0.9, 1.0],
}
STACK = ("flash_attention", "kv_expanded", "reserve_gib", "fragmentation")
MOE = ("fsdp_eff", "a2a_eff", "moe_imbalance")
SHARED = tuple(k for k in GRID if k not in MOE)
DENSE_ONLY = ("gemm_eff", "gemm_knee", "hbm_eff", "intra_eff", "inter_eff")


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


def params_for(rows) -> tuple[str, ...]:
    """Keys these rows can inform: dense rows never exercise the MoE keys, nor the flash
    attention core when their stack materialised the scores."""
    moe = any(r.metric == "mfu" for r in rows)
    keys = tuple(GRID) if moe else DENSE_ONLY
    if stack_facts(rows).get("flash_attention", 1.0) < 0.5:
        keys = tuple(k for k in keys if k != "attn_eff")
    return keys


def fit_values(rows, run_rows, summarize, start: dict, params=None, rounds: int = 2,
               log=print) -> dict:
    """Calibration values (``start`` updated) that minimise the objective on ``rows``."""
    first = run_rows(rows, start)
    frozen = [dataclasses.replace(r, pins=frozen_pins(r, lay)) for r, _, lay in first if lay]
    best = dict(start)
    best_score = objective(run_rows(frozen, best), summarize)
    log(f"start {best_score:.4f} {best}")
    for _ in range(rounds):
        for key in params or params_for(rows):
            for value in GRID[key]:
                trial = {**best, key: value}
                score = objective(run_rows(frozen, trial), summarize)
                if score < best_score - 1e-6:
                    best, best_score = trial, score
                    log(f"  {key} = {value}: {score:.4f}")
    return best


def transfer(fitted: dict, target_rows) -> dict:
    """What a fit on other rows says about ``target_rows``' device: the SHARED keys, over the
    target's own STACK facts; everything else at the physical defaults."""
    return {**stack_facts(target_rows), **{k: v for k, v in fitted.items() if k in SHARED}}


def fit(device: str, rows, run_rows, summarize, order_ok, rounds: int = 2) -> dict:
    """Re-fit ``device`` on its rows, starting from its spec; prints the block to paste."""
    best = fit_values(rows, run_rows, summarize, dict(rows[0].job.cluster.device.calibration),
                      rounds=rounds)
    final = run_rows(rows, best)
    mean, worst = summarize(final)
    print(f"fitted (full search): mean {mean:.1%} max {worst:.1%}")
    body = "\n".join(f"    {k} = {v:g}" for k, v in sorted(best.items()))
    print(f"  calibration {{\n{body}\n  }}")
    return best
