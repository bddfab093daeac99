"""The pruning ILP — with planner/ilp.py, one of the two modules that import pulp.

A multiple-choice knapsack with a shared first choice. Variables:

    y[h]     = 1 iff the pruned model has hidden choice h                       (binary)
    x[h,g,i] = 1 iff block kind g takes option i (widths + layer count) at h    (binary)

    maximise   sum_h v[h] y[h] + sum_{h,g,i} v[h,g,i] x[h,g,i]      (log of the retained importance)
    subject to sum_h y[h] = 1                                         (one hidden size)
               sum_i x[h,g,i] = y[h]             for every h, g       (one option per kind, at that h)
               c_b[h] y[h] + sum_{g,i} c_b[h,g,i] x[h,g,i] <= L_b     for every h and budget b
               not all of y[h*], x[h*,g,i*_g] for each excluded selection   (no-good cuts)

``solve_top`` lets k hidden choices be taken at once (sum_h y[h] <= k, a bonus per taken choice):
as the budget rows are per choice, its optimum is the k best hidden sizes, each with its best
options — the ranked candidates in one solve.

Budgets are scaled by their limits (each row reads <= 1) so parameter counts near 1e10 meet the
solver's tolerances; the caller re-checks the chosen selection in exact integers.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, Optional

import pulp

OPTIMAL, FEASIBLE = "optimal", "feasible"


@dataclass(frozen=True)
class Item:
    value: float
    cost: tuple[float, ...]


@dataclass(frozen=True)
class Choice:
    value: float
    cost: tuple[float, ...]
    groups: tuple[tuple[Item, ...], ...]  # per group, the items one of which must be taken


@dataclass(frozen=True)
class Problem:
    choices: tuple[Choice, ...]
    limits: tuple[float, ...]  # one per budget, in the order of every cost vector


@dataclass(frozen=True)
class Selection:
    choice: int
    items: tuple[int, ...]  # item index per group
    value: float
    status: str


def selection_value(problem: Problem, choice: int, items: tuple[int, ...]) -> float:
    c = problem.choices[choice]
    return c.value + sum(g[i].value for g, i in zip(c.groups, items))


def selection_cost(problem: Problem, choice: int, items: tuple[int, ...]) -> tuple[float, ...]:
    c = problem.choices[choice]
    return tuple(base + sum(g[i].cost[b] for g, i in zip(c.groups, items)) for b, base in enumerate(c.cost))


def solve(problem: Problem, forbidden: Iterable[int] = (), excluded: Iterable[Selection] = (),
          time_limit: float = 10.0) -> Optional[Selection]:
    """The best selection, or None when no selection meets every budget."""
    found = solve_top(problem, 1, forbidden, excluded, time_limit)
    return found[0] if found else None


def solve_top(problem: Problem, k: int, forbidden: Iterable[int] = (), excluded: Iterable[Selection] = (),
              time_limit: float = 10.0) -> list[Selection]:
    """The best selection of each of the ``k`` choices whose best is highest, best first (fewer when
    fewer choices can meet the budgets). One solve: with sum_h y[h] <= k and every budget row
    written per choice, the choices do not interact, so the optimum takes the k best
    per-choice optima; a bonus per taken choice (larger than any |value|) makes taking more always
    better."""
    forbidden = set(forbidden)
    allowed = [h for h in range(len(problem.choices)) if h not in forbidden]
    if not allowed or k < 1 or any(limit <= 0 for limit in problem.limits):
        return []
    bonus = 1.0 + max(abs(c.value) + sum(max(abs(i.value) for i in g) for g in c.groups) for c in problem.choices)
    prob = pulp.LpProblem("prune", pulp.LpMaximize)
    y = {h: prob.add_variable(f"y_{h}", cat="Binary") for h in allowed}
    x = {(h, g, i): prob.add_variable(f"x_{h}_{g}_{i}", cat="Binary")
         for h in allowed for g, items in enumerate(problem.choices[h].groups) for i in range(len(items))}
    prob += (pulp.lpSum((problem.choices[h].value + bonus) * y[h] for h in allowed)
             + pulp.lpSum(problem.choices[h].groups[g][i].value * v for (h, g, i), v in x.items()))
    prob += pulp.lpSum(y.values()) <= k, "k_choices"
    for h in allowed:
        c = problem.choices[h]
        for g, items in enumerate(c.groups):
            prob += pulp.lpSum(x[h, g, i] for i in range(len(items))) == y[h], f"one_option_{h}_{g}"
        for b, limit in enumerate(problem.limits):  # each taken choice within every budget
            prob += (c.cost[b] / limit * y[h]
                     + pulp.lpSum(c.groups[g][i].cost[b] / limit * x[h, g, i]
                                  for g, items in enumerate(c.groups) for i in range(len(items)))
                     <= 1), f"budget_{h}_{b}"
    for n, sel in enumerate(excluded):
        if sel.choice in y:
            picked = [y[sel.choice]] + [x[sel.choice, g, i] for g, i in enumerate(sel.items)]
            prob += pulp.lpSum(picked) <= len(picked) - 1, f"exclude_{n}"
    return _run(prob, problem, y, x, time_limit)


def _run(prob, problem: Problem, y, x, time_limit: float) -> list[Selection]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit))
    # PuLP's `status` says "Optimal" even for a timed-out solve; sol_status tells them apart.
    if prob.sol_status == pulp.LpSolutionOptimal:
        status = OPTIMAL
    elif prob.sol_status == pulp.LpSolutionIntegerFeasible:
        status = FEASIBLE
    else:
        return []
    out = []
    for h in (h for h in y if (y[h].value() or 0.0) > 0.5):
        items = tuple(max(range(len(group)), key=lambda i: x[h, g, i].value() or 0.0)
                      for g, group in enumerate(problem.choices[h].groups))
        out.append(Selection(h, items, selection_value(problem, h, items), status))
    return sorted(out, key=lambda s: (-s.value, s.choice))
