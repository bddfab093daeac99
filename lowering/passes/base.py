"""The pass protocol: a named GraphModule -> GraphModule function with the facts it requires and
ensures, and a verifier that runs after it. Facts live in ``gm.meta["plait.facts"]``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.fx

from plait.ir import legality
from plait.ir.errors import PlaitError
from plait.ir.model import ModelSpec
from plait.ir.plan import Layout, ParallelPlan
from plait.ir.precision import PrecisionPolicy

FACTS = "plait.facts"


class VerifyError(PlaitError):
    """A pass produced a graph that breaks one of its promises (a compiler bug, not user input)."""


@dataclass(frozen=True)
class Target:
    """What one rank's program is lowered for: the plan and the rank's coordinates."""

    spec: ModelSpec
    plan: ParallelPlan
    tp_rank: int = 0
    cp_rank: int = 0  # index in the context-parallel group (the zigzag chunks this rank holds)
    pp_rank: int = 0
    rank: int = 0  # global rank (the expert-side coordinates come from it)
    precision: PrecisionPolicy = PrecisionPolicy("fp32", 0)  # which GEMMs run in fp8

    @property
    def layout(self) -> Layout:
        return self.plan.layout

    @property
    def micro_batch(self) -> tuple[int, int]:
        return self.layout.mbs, self.plan.seq_len


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[torch.fx.GraphModule, Target], torch.fx.GraphModule]
    verify: Callable[[torch.fx.GraphModule, Target], None]
    requires: tuple[str, ...] = ()
    ensures: tuple[str, ...] = ()
    doc: str = field(default="", compare=False)

    def __call__(self, gm: torch.fx.GraphModule, target: Target) -> torch.fx.GraphModule:
        facts = gm.meta.get(FACTS, set())
        missing = [f for f in self.requires if f not in facts]
        if missing:
            raise VerifyError(f"pass {self.name} requires {missing}; the graph has {sorted(facts)}")
        out = self.run(gm, target)
        out.meta[FACTS] = set(facts) | set(self.ensures)
        try:
            self.verify(out, target)
        except VerifyError:
            raise
        except Exception as err:  # a verifier crash is a failed verification
            raise VerifyError(f"verifier of pass {self.name} failed: {err}") from err
        return out


def require_legal(t: Target, *topics: str) -> None:
    """The legality-and-capability table's rows about ``topics`` (LEGAL and RUNNABLE) hold for the
    plan being lowered; else LayoutError with the arithmetic (ir/legality.py states each rule)."""
    legality.require(legality.Workload.of_plan(t.spec, t.plan), t.layout, topics)


def run_passes(gm: torch.fx.GraphModule, passes: list[Pass], target: Target,
               log: Callable[[str], None] | None = None) -> torch.fx.GraphModule:
    for p in passes:
        gm = p(gm, target)
        if log:
            log(f"{p.name}: ok ({len(gm.graph.nodes)} nodes)")
    return gm


def replace_uses_after(node: torch.fx.Node, new: torch.fx.Node) -> None:
    """Point every user of ``node`` except ``new`` itself at ``new``."""
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
