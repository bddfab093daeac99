"""Fit one device kind's cost-model calibration to the reference rows (used by
`benchmarks/fidelity.py --fit DEVICE`). Coordinate descent over a few physical efficiencies; the
layout knobs each row's search picked are frozen during the fit (recompute stays open), then the
full fidelity table re-checks the fitted values. Prints the `calibration { ... }` block to paste
into specs/devices/DEVICE.plait."""
from __future__ import annotations

import dataclasses

# parameter -> candidate values (physically plausible ranges)
GRID = {
    "fsdp_eff": [0.4, 0.5, 0.6, 0.7, 0.8, 1.0],
    "fsdp_overlap": [0.0, 0.25, 0.5, 0.75, 0.9],
    "a2a_eff": [0.3, 0.4, 0.5, 0.6, 0.8, 1.0],
    "inter_eff": [0.5, 0.6, 0.7, 0.8, 0.9],
    "intra_eff": [0.5, 0.6, 0.7, 0.8, 0.9],
    "gemm_eff": [0.6, 0.65, 0.7, 0.75, 0.8, 0.85],
    "gemm_knee": [64, 128, 192, 256, 384],
    "attn_eff": [0.3, 0.4, 0.5, 0.6, 0.7],
    "hbm_eff": [0.6, 0.7, 0.8, 0.9],
    "overlap": [0.5, 0.7, 0.9, 1.0],
}
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


def objective(results, summarize, order_ok) -> float:
    mean, worst = summarize(results)
    return mean + 2 * max(0.0, worst - 0.15) + order_margin_penalty(results)


def fit(device: str, rows, run_rows, summarize, order_ok, rounds: int = 2) -> dict:
    base = dict(rows[0].job.cluster.device.calibration)
    first = run_rows(rows, base)
    frozen = [dataclasses.replace(r, pins=frozen_pins(r, lay)) for r, _, lay in first if lay]
    params = DENSE_ONLY if not any(r.metric == "mfu" for r in rows) else tuple(GRID)
    best = dict(base)
    best_score = objective(run_rows(frozen, best), summarize, order_ok)
    print(f"start {best_score:.4f} {best}")
    for _ in range(rounds):
        for key in params:
            for value in GRID[key]:
                trial = {**best, key: value}
                score = objective(run_rows(frozen, trial), summarize, order_ok)
                if score < best_score - 1e-6:
                    best, best_score = trial, score
                    print(f"  {key} = {value}: {score:.4f}")
    final = run_rows(rows, best)
    mean, worst = summarize(final)
    print(f"fitted (full search): mean {mean:.1%} max {worst:.1%}")
    body = "\n".join(f"    {k} = {v:g}" for k, v in sorted(best.items()))
    print(f"  calibration {{\n{body}\n  }}")
    return best
