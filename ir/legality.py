"""The legality-and-capability table: one row per rule a layout must satisfy, asked by every stage.

Two levels, kept apart on purpose:

  LEGAL     Megatron-Core's rules: a layout that breaks one cannot train this model anywhere
            ("experts (8) must be divisible by ep (3)"). The planner never enumerates it.
  RUNNABLE  what plait's runtime executes today: a legal layout that breaks one of these is a
            plan Megatron could run but plait cannot yet ("fsdp shards expert weights only when
            edp = dp*cp"). The planner ranks such plans, offers only runnable ones to `plait run`,
            and names the better ones it cannot run with the row that stops each.

The rows are data: ``Rule(name, level, topic, reads, check)``; ``check(workload, layout)`` returns
None or the reason with its arithmetic. ``topic`` says what the rule is about (TOPICS: a lowering
pass asks only the rows of the parallelism it implements); ``reads`` names the Layout fields the
check looks at, so the planner judges a rule once per mesh or once per knob variant.

Rules that belong to a block kind live in that kind's ``rules`` facet (``plait/kinds/<kind>/
rules.py``, each exposing ``RULES``); the table asks only the kinds the model uses. The rest
(world, batch, pipeline, context and sequence parallelism, vocabulary) are below.
Pure: no torch, no solver, so the planner, the passes and the launch check can all import it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Optional

from . import kinds
from .errors import LayoutError
from .job import TrainJob
from .model import ModelSpec
from .plan import CP_COMMS, DISPATCHERS, DP_KINDS, RECOMPUTE, Layout, ParallelPlan, parse_order
from .units import unit_name, units

LEGAL, RUNNABLE = "legal", "runnable"
LEVELS = (LEGAL, RUNNABLE)
TOPICS = ("names", "world", "tensor", "sequence", "context", "experts", "pipeline", "batch")
SIZES = ("tp", "cp", "dp", "pp", "vpp", "ep", "etp", "edp", "mbs")
# The fields that make a mesh; the planner judges rules reading only these once per mesh and the
# others (vpp, mbs, dp_kind, recompute) once per knob variant.
MESH_FIELDS = frozenset(("tp", "cp", "dp", "pp", "ep", "etp", "edp", "sp", "cp_comm", "order",
                         "dispatcher"))


@dataclass(frozen=True)
class Workload:
    """What a layout is judged against: the model, the job's sequence and batch, the world."""

    model: ModelSpec
    seq_len: int
    global_batch: int
    world: int
    cluster: str = ""  # the cluster in a message ("cluster 'eos': 16*8"); "": a plan's world

    @classmethod
    def of_job(cls, job: TrainJob) -> "Workload":
        c = job.cluster
        return cls(job.model, job.seq_len, job.global_batch, c.world,
                   f"cluster {c.name!r}: {c.nodes}*{c.gpus_per_node}")

    @classmethod
    def of_plan(cls, model: ModelSpec, plan: ParallelPlan) -> "Workload":
        return cls(model, plan.seq_len, plan.global_batch, plan.world)


Check = Callable[[Workload, Layout], Optional[str]]


@dataclass(frozen=True)
class Rule:
    name: str
    level: str  # LEGAL | RUNNABLE
    topic: str  # one of TOPICS
    reads: frozenset  # the Layout fields the check looks at
    check: Check = None
    gate: bool = False  # the other rules assume it holds: stop at its violation

    @property
    def on_mesh(self) -> bool:
        return self.reads <= MESH_FIELDS


def rule(name: str, level: str, topic: str, reads: Iterable[str], check: Check,
         gate: bool = False) -> Rule:
    assert level in LEVELS and topic in TOPICS, (level, topic)
    return Rule(name, level, topic, frozenset(reads), check, gate)


@dataclass(frozen=True)
class Violation:
    rule: Rule
    message: str

    def __str__(self) -> str:
        return self.message


def divides(what: str, value: int, by_name: str, by: int) -> Optional[str]:
    """None when ``by`` divides ``value``, else the reason with its arithmetic."""
    if by > 0 and value % by == 0:
        return None
    return f"{what} ({value}) must be divisible by {by_name} ({by}): {value} % {by} = {value % by}"


# ------------------------------------------------------------------------------------------------
# Core rows (every model)
# ------------------------------------------------------------------------------------------------

def _names(w: Workload, lay: Layout) -> Optional[str]:
    for key, value, allowed in (("dp_kind", lay.dp_kind, DP_KINDS),
                                ("recompute", lay.recompute, RECOMPUTE),
                                ("dispatcher", lay.dispatcher, DISPATCHERS),
                                ("cp_comm", lay.cp_comm, CP_COMMS)):
        if value not in allowed:
            return f"{key} = {value!r} is not one of {', '.join(allowed)}"
    try:
        parse_order(lay.order)
    except LayoutError as e:
        return e.message
    if min(getattr(lay, k) for k in SIZES) < 1:
        return "every parallel size must be at least 1"
    return None


def _world(w: Workload, lay: Layout) -> Optional[str]:
    if lay.world == w.world:
        return None
    where = f"the cluster has {w.world} GPUs ({w.cluster})" if w.cluster else \
        f"the plan's world is {w.world}"
    return f"tp*cp*dp*pp = {lay.tp}*{lay.cp}*{lay.dp}*{lay.pp} = {lay.world} but {where}"


def _expert_world(w: Workload, lay: Layout) -> Optional[str]:
    if lay.expert_world == lay.world:
        return None
    return (f"etp*ep*edp*pp = {lay.etp}*{lay.ep}*{lay.edp}*{lay.pp} = {lay.expert_world} but "
            f"tp*cp*dp*pp = {lay.world}")


def _no_experts(w: Workload, lay: Layout) -> Optional[str]:
    if w.model.is_moe or (lay.ep == 1 and lay.etp == lay.tp):
        return None
    return (f"model {w.model.name!r} has no MoE layers: ep must be 1 and etp equal tp "
            f"(got ep={lay.ep}, etp={lay.etp}, tp={lay.tp})")


def zigzag_chunks(seq_len: int, cp: int) -> Optional[str]:
    """Load-balanced causal context parallelism cuts every sequence into 2*cp equal chunks."""
    if cp == 1 or seq_len % (2 * cp) == 0:
        return None
    return (f"seq_len ({seq_len}) must be divisible by 2*cp = {2 * cp} (load-balanced causal "
            f"context parallelism): {seq_len} % {2 * cp} = {seq_len % (2 * cp)}")


def _context(w: Workload, lay: Layout) -> Optional[str]:
    return zigzag_chunks(w.seq_len, lay.cp)


def _sequence_parallel(w: Workload, lay: Layout) -> Optional[str]:
    if not lay.sp:
        return None
    if lay.tp == 1:
        return "sequence parallel needs tp > 1 (tp = 1)"
    tokens = w.seq_len // lay.cp  # the tokens of a CP rank, split again over TP
    if tokens % lay.tp:
        return (f"sequence parallel splits seq_len/cp = {w.seq_len}/{lay.cp} = {tokens} tokens over "
                f"tp = {lay.tp}: {tokens} % {lay.tp} = {tokens % lay.tp}")
    return None


def _stages(w: Workload, lay: Layout) -> Optional[str]:
    n, chunks = len(units(w.model)), lay.pp * lay.vpp
    if n < chunks:
        return (f"{n} {unit_name(w.model)} cannot fill pp*vpp = {lay.pp}*{lay.vpp} = {chunks} "
                f"pipeline stages")
    if lay.vpp > 1 and lay.pp == 1:
        return f"an interleaved schedule (vpp = {lay.vpp}) needs pp > 1"
    return None


def _batch(w: Workload, lay: Layout) -> Optional[str]:
    per, gb = lay.dp * lay.mbs, w.global_batch
    if gb % per:
        return (f"global batch ({gb}) must be divisible by dp*mbs = {lay.dp}*{lay.mbs} = {per}: "
                f"{gb} % {per} = {gb % per}")
    m = gb // per
    if lay.vpp > 1 and m % lay.pp:
        return (f"the interleaved schedule needs micro-batches ({gb}/({lay.dp}*{lay.mbs}) = {m}) "
                f"divisible by pp ({lay.pp})")
    return None


def _vocab(w: Workload, lay: Layout) -> Optional[str]:
    # Megatron pads the vocabulary to a multiple of tp; plait's vocab-parallel embedding, head
    # and cross entropy split the model's own vocabulary into equal shards
    return divides("vocab", w.model.vocab, "tp", lay.tp) if lay.tp > 1 else None


def _learned_positions(axis: str) -> Check:
    def check(w: Workload, lay: Layout) -> Optional[str]:
        size = getattr(lay, axis)
        if w.model.learned_positions and size > 1:
            return (f"plait lowers learned position embeddings only with {axis} = 1 "
                    f"({axis} = {size})")
        return None
    return check


CORE: tuple[Rule, ...] = (
    rule("names", LEGAL, "names", ("dp_kind", "recompute", "dispatcher", "cp_comm", "order") + SIZES,
         _names, gate=True),
    rule("world", LEGAL, "world", ("tp", "cp", "dp", "pp"), _world),
    rule("expert-world", LEGAL, "world", ("tp", "cp", "dp", "pp", "etp", "ep", "edp"), _expert_world),
    rule("no-experts", LEGAL, "world", ("tp", "ep", "etp"), _no_experts),
    rule("context", LEGAL, "context", ("cp",), _context),
    rule("sequence-parallel", LEGAL, "sequence", ("sp", "tp", "cp"), _sequence_parallel),
    rule("stages", LEGAL, "pipeline", ("pp", "vpp"), _stages),
    rule("batch", LEGAL, "batch", ("dp", "mbs", "vpp", "pp"), _batch),
    rule("vocab-tp", RUNNABLE, "tensor", ("tp",), _vocab),
    rule("learned-positions-tp", RUNNABLE, "tensor", ("tp",), _learned_positions("tp")),
    rule("learned-positions-cp", RUNNABLE, "context", ("cp",), _learned_positions("cp")),
)


# ------------------------------------------------------------------------------------------------
# The table of one workload
# ------------------------------------------------------------------------------------------------

@lru_cache(maxsize=64)
def rules_for(layer_kinds: frozenset) -> tuple[Rule, ...]:
    """The core rows and the rows of every kind in ``layer_kinds`` (registry order)."""
    rows = list(CORE)
    for name in kinds.names():
        if name in layer_kinds:
            rows += kinds.facet(name, "rules").RULES
    return tuple(rows)


class Table:
    """The rows that apply to one workload, grouped the ways the stages ask."""

    def __init__(self, workload: Workload):
        self.workload = workload
        self.rules = rules_for(frozenset(workload.model.layers))
        self._subsets: dict = {}

    def select(self, levels: tuple[str, ...] = LEVELS, topics: Optional[tuple[str, ...]] = None,
               phase: Optional[str] = None) -> tuple[Rule, ...]:
        """Rows of ``levels``; ``topics``: only rows about these; ``phase``: "mesh" (reads only
        mesh fields) or "knob" (reads another), gate rows left out."""
        key = (levels, topics, phase)
        if key not in self._subsets:
            self._subsets[key] = tuple(
                r for r in self.rules if r.level in levels
                and (topics is None or r.topic in topics)
                and (phase is None or (not r.gate and r.on_mesh == (phase == "mesh"))))
        return self._subsets[key]

    def violations(self, lay: Layout, rows: Optional[tuple[Rule, ...]] = None) -> list[Violation]:
        """Every row ``lay`` breaks (all rows by default), in table order."""
        out = []
        for r in self.rules if rows is None else rows:
            msg = r.check(self.workload, lay)
            if msg:
                out.append(Violation(r, msg))
                if r.gate:  # the other rows assume well-formed values
                    break
        return out

    def first(self, lay: Layout, rows: tuple[Rule, ...]) -> Optional[Violation]:
        """The first row of ``rows`` that ``lay`` breaks (the planner's cheap question)."""
        for r in rows:
            msg = r.check(self.workload, lay)
            if msg:
                return Violation(r, msg)
        return None

    def require(self, lay: Layout, levels: tuple[str, ...] = LEVELS,
                topics: Optional[tuple[str, ...]] = None, what: str = "") -> None:
        """Raise LayoutError listing every row of ``levels`` (about ``topics``) ``lay`` breaks."""
        problems = self.violations(lay, self.select(levels, topics))
        if problems:
            raise LayoutError(refusal(lay, problems, what or f"model {self.workload.model.name!r}"))


def refusal(lay: Layout, problems: list[Violation], what: str) -> str:
    """The message for a refused layout: legal rows first, then what plait cannot run yet."""
    lines = [f"  - {v.message}" if v.rule.level == LEGAL
             else f"  - plait cannot run this yet ({v.rule.name}): {v.message}" for v in problems]
    return f"layout {lay.short()} is not possible for {what}:\n" + "\n".join(lines)


@lru_cache(maxsize=32)
def table(workload: Workload) -> Table:
    """The table of ``workload`` (kept: the planner asks it for every mesh of a search)."""
    return Table(workload)


def require(workload: Workload, lay: Layout, topics: Optional[tuple[str, ...]] = None) -> None:
    """Every row (LEGAL and RUNNABLE) about ``topics`` holds, else LayoutError: the lowering
    passes' question."""
    table(workload).require(lay, LEVELS, topics)
