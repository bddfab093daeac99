"""Plans the planner ranks but plait's runtime cannot execute yet, and how to say so.

The search ranks every LEGAL layout (Megatron-Core's rules, plait/ir/legality.py). A layout that
also breaks a RUNNABLE row is *blocked*: by default (``runnable_only``) the search offers only
runnable plans, and solves the few best blocked candidates that could beat its winner so that
`plait plan --explain` and `plait run` can name each better plan and the row that stops it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from plait.ir.legality import Violation
from plait.ir.plan import ParallelPlan

from .explain import family_of
from .wording import percent, seconds_pair

BLOCKED_SOLVES = 3  # partitions solved for blocked candidates (one per family)
INF = float("inf")


@dataclass(frozen=True)
class BlockedPlan:
    """A legal plan plait cannot run yet: the plan and the first RUNNABLE row it breaks."""

    plan: ParallelPlan
    rule: str
    reason: str

    def line(self, winner: Optional[ParallelPlan]) -> str:
        lay = self.plan.layout
        head = f"{lay.short()} ({lay.dp_kind})"
        if winner is not None:
            theirs, ours = seconds_pair(self.plan.prediction.step_time,
                                        winner.prediction.step_time)
            pct = (self.plan.prediction.step_time / winner.prediction.step_time - 1) * 100
            head += f" would step in {theirs} s vs {ours} s ({percent(pct)})"
        return f"{head}, but plait cannot run it yet ({self.rule}): {self.reason}"


def better_blocked(cands: list, best_step: float,
                   solve_one: Callable[[object], Optional[ParallelPlan]]) -> list[BlockedPlan]:
    """The blocked candidates (``cand.blocked`` set) whose solved plan beats ``best_step`` (INF:
    whatever is best), best first, one per family, at most BLOCKED_SOLVES solves."""
    out: list[BlockedPlan] = []
    families: set[str] = set()
    solves = 0
    for cand in sorted(cands, key=lambda c: c.key):
        if solves >= BLOCKED_SOLVES:
            break
        family = family_of(cand.layout)
        if cand.lower >= best_step or family in families:
            continue
        solves += 1
        plan = solve_one(cand)
        if plan is not None and plan.prediction.step_time < best_step:
            families.add(family)
            out.append(BlockedPlan(plan, cand.blocked.rule.name, cand.blocked.message))
    out.sort(key=lambda b: (b.plan.prediction.step_time, b.plan.layout.short()))
    return out


def winner_lines(blocked: list[BlockedPlan], winner: ParallelPlan) -> list[str]:
    """The winner's explanation: which better plans plait cannot run yet, and why."""
    return [f"plait runs the best plan it can: {b.line(winner)}" for b in blocked]


def none_runnable(job_name: str, blocked: list[BlockedPlan]) -> str:
    """No plan plait can run: the best legal ones and the rows that stop them."""
    lines = "\n".join(f"  - {b.line(None)}" for b in blocked)
    return (f"no layout plait can run yet for job {job_name!r}; the best legal ones:\n{lines}\n"
            "  hint: `plait plan --legal` ranks them (Megatron-LM runs them: `plait export "
            "megatron`), or pin a layout that avoids these rules")


def blocked_family_reason(v: Violation) -> str:
    return f"plait cannot run it yet ({v.rule.name}): {v.message}"
