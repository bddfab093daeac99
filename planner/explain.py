"""Why a plan wins, why each other family loses, and what would help when nothing fits — in numbers.

A *family* is a mesh: (tp, cp, pp) on the dense side and (etp, ep) on the expert side; its members
differ in micro-batch, DP flavour, virtual stages and recompute.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from plait.ir import counts, kinds
from plait.ir.job import TrainJob
from plait.ir.plan import Layout, ParallelPlan

from .cost.context import Calibration, Context, layer_kinds
from .wording import device_word, flops_rate, percent, seconds, seconds_pair, significant
from .cost.evaluate import evaluate
from .cost.pipeline import even_sizes, fsdp_host_seconds, stages_of

GiB = float(2**30)
# a family whose only number is its time floor: no even split fitted when it was screened
BOUND_ONLY = "screened out (lower bound; no even split fits)"


def family_of(lay: Layout) -> str:
    s = f"tp{lay.tp} cp{lay.cp} pp{lay.pp} dp{lay.dp}"
    if lay.ep > 1 or lay.etp != lay.tp:
        s += f" | etp{lay.etp} ep{lay.ep} edp{lay.edp}"
    return s


@dataclass(frozen=True)
class Rejection:
    family: str
    reason: str
    step_time: Optional[float] = None  # best predicted step of the family, when one fits
    memory_need: Optional[float] = None  # bytes, when none fits


@dataclass
class _Record:
    layout: Layout
    step: float = float("inf")
    plan: Optional[ParallelPlan] = None
    need: float = float("inf")  # smallest memory need when nothing fits
    how: str = ""
    cand: object = None  # the best estimated candidate, evaluated on demand for --explain
    blocked: Optional[str] = None  # the RUNNABLE row that stops the family's candidates


class Families:
    """The best outcome seen per family during a search."""

    def __init__(self, job: TrainJob):
        self.job = job
        self.records: dict[str, _Record] = {}

    def _rec(self, lay: Layout) -> _Record:
        return self.records.setdefault(family_of(lay), _Record(layout=lay))

    def out_of_memory(self, mesh: Layout, need: float) -> None:
        rec = self._rec(mesh)
        if need < rec.need:
            rec.need, rec.how = need, "even fully sharded (FSDP) with full recompute"

    def infeasible(self, cand) -> None:
        table = cand.table
        sizes = even_sizes(len(table.units), table.chunks)
        full = (2,) * table.chunks
        need = evaluate(table, stages_of(table, sizes, full)).peak_memory
        rec = self._rec(cand.layout)
        if need < rec.need and rec.plan is None:
            rec.need, rec.how, rec.layout = need, "with full recompute", cand.layout

    def estimated(self, cand) -> None:
        rec = self._rec(cand.layout)
        if cand.quick < rec.step and rec.plan is None:
            rec.step, rec.layout, rec.how = cand.quick, cand.layout, "estimated (even split)"
            rec.cand = cand

    def screened(self, mesh: Layout, screen: float, floor: float) -> None:
        """A mesh dropped before expansion: its screening estimate, or its floor when none fit."""
        rec = self._rec(mesh)
        if screen < float("inf") and screen < rec.step:
            rec.step, rec.how = screen, "screened out (even-split estimate)"
        elif rec.step == float("inf"):
            rec.step, rec.how = floor, BOUND_ONLY

    def blocked(self, lay: Layout, violation) -> None:
        """A candidate plait cannot run yet (runnable-only searches leave it unsolved)."""
        rec = self._rec(lay)
        if rec.blocked is None:
            rec.blocked = f"plait cannot run it yet ({violation.rule.name}): {violation.message}"

    def solved(self, cand, plan: ParallelPlan) -> None:
        rec = self._rec(cand.layout)
        if rec.plan is None or plan.prediction.step_time < rec.plan.prediction.step_time:
            rec.plan, rec.step, rec.layout, rec.how = plan, plan.prediction.step_time, plan.layout, ""

    def smallest_need(self) -> Optional[tuple[float, Layout]]:
        needs = [(r.need, r.layout) for r in self.records.values() if r.need < float("inf")]
        return min(needs, key=lambda x: (x[0], x[1].short())) if needs else None

    def rejections(self, winner: ParallelPlan) -> list[Rejection]:
        win_family = family_of(winner.layout)
        out = []
        for fam, rec in sorted(self.records.items(),
                               key=lambda kv: (kv[1].how == BOUND_ONLY, kv[1].step, kv[1].need, kv[0])):
            if fam == win_family:
                continue
            if rec.how == BOUND_ONLY:  # a floor below the winner says nothing about its speed
                out.append(Rejection(fam, f"no even split fits in memory at the screening "
                                          f"micro-batch (time floor {seconds(rec.step)} s, not "
                                          f"evaluated further)"))
            elif rec.step < float("inf"):
                out.append(Rejection(fam, self._slower(winner, rec), step_time=rec.step))
            elif rec.need < float("inf"):
                cap = self.job.cluster.device.memory
                out.append(Rejection(fam, f"out of memory by {(rec.need - cap) / GiB:.1f} GiB: "
                                     f"needs {rec.need / GiB:.1f} GiB of {cap / GiB:.0f} GiB "
                                     f"{rec.how}", memory_need=rec.need))
            elif rec.blocked:
                out.append(Rejection(fam, rec.blocked))
        return out

    def _slower(self, winner: ParallelPlan, rec: _Record) -> str:
        w = winner.prediction
        pct = (rec.step / w.step_time - 1) * 100
        theirs, ours = seconds_pair(rec.step, w.step_time)
        parts = [f"{percent(pct)} step time ({theirs} s vs {ours} s)"]
        other = rec.plan or self._even_split_plan(rec)
        if other is not None:
            parts += differences(self.job, winner, other)
        else:
            parts += topology_facts(self.job, rec.layout, only_bad=True)
        if rec.how:
            parts.append(rec.how)
        return "; ".join(parts)

    def _even_split_plan(self, rec: _Record) -> Optional[ParallelPlan]:
        """The estimated candidate as a plan (even split, its recompute) to compare with."""
        cand = rec.cand
        if cand is None or cand.quick_option < 0:
            return None
        table = cand.table
        sizes = even_sizes(len(table.units), table.chunks)
        stages = stages_of(table, sizes, (cand.quick_option,) * table.chunks)
        return ParallelPlan(job=self.job.name, model=self.job.model.name,
                            cluster=self.job.cluster.name, world=self.job.cluster.world,
                            layout=cand.layout, stages=stages, global_batch=self.job.global_batch,
                            seq_len=self.job.seq_len, prediction=evaluate(table, stages))


def topology_facts(job: TrainJob, lay: Layout, only_bad: bool = False) -> list[str]:
    """Which collectives stay inside a node and which cross the network."""
    ctx = Context(job, lay)
    facts = []
    checks = [("dense", "tp", "tensor-parallel", lay.tp), ("dense", "cp", "context-parallel ring",
                                                           lay.cp)]
    for kind in layer_kinds(job.model):  # the kinds' own groups (MoE: the expert all-to-all)
        checks.extend(kinds.facet(kind, "cost").topology_checks(lay))
    for side, name, what, size in checks:
        if size <= 1:
            continue
        g = ctx.group(side, name)
        if g.crosses_nodes:
            facts.append(f"{what} crosses nodes ({name} group of {g.size} spans {g.nodes} nodes)")
        elif not only_bad:
            facts.append(f"{what} stays inside a node ({name} group of {g.size})")
    return facts


def overlap_facts(job: TrainJob, lay: Layout) -> list[str]:
    """How much of FSDP's gathers and gradient scatters, and of ring context parallelism's K/V
    exchange, the compute beside them hides, and where that number comes from: the device's
    calibration (a spec value, or `--calibration` measured by `plait calibrate`) or the
    literature default of planner/cost/context.py."""
    given, cal = dict(job.cluster.device.calibration), Calibration.of(job.cluster.device)

    def part(kind: str, what: str) -> str:
        key = f"overlap_{kind}"
        source = ("device calibration" if key in given else
                  "default: compute runs 18.9% slower beside NCCL, Lee et al. 2025")
        return f"{what} {getattr(cal, key):.2f} ({source})"

    facts = []
    if lay.dp_kind == "fsdp":
        facts.append("FSDP traffic hidden behind compute, of the time they overlap: "
                     + part("fsdp", "unit gathers and gradient scatters"))
        host = fsdp_host_seconds(Context(job, lay))
        if host > 0:
            facts.append(f"FSDP2's own host work (hooks, copies) {host * 1e3:.2f} ms per unit and "
                         "micro-batch (device calibration)")
    if lay.cp > 1 and lay.cp_comm == "ring":
        facts.append("context-parallel ring hidden behind the attention core, of the time they "
                     "overlap: " + part("p2p", "K/V sends"))
    if lay.cp > 1:
        facts += cp_host_facts(job, lay)
    return facts


def optimizer_fact(job: TrainJob) -> str:
    """The optimizer step's price per parameter, and whether it is what `plait run` steps on the
    cluster's device (counts.adamw_path) or another stack's (Megatron-Core's fused Adam)."""
    given = dict(job.cluster.device.calibration)
    bytes_ = Calibration.of(job.cluster.device).optimizer_bytes
    path = counts.adamw_path(counts.torch_device_type(job.cluster.backend))
    source = "device calibration" if "optimizer_bytes" in given else "default"
    ours = f"global-norm clip + torch's {path.kernel} AdamW"
    line = f"optimizer step {bytes_:g} bytes per parameter ({source}"
    if bytes_ == path.step_bytes:
        return line + f": plait's runtime, {ours})"
    if bytes_ == counts.FUSED_ADAM_STEP_BYTES:
        line += ": Megatron-Core's fused Adam"
    return line + f"); plait's runtime moves {path.step_bytes} ({ours})"


def cp_host_facts(job: TrainJob, lay: Layout) -> list[str]:
    """The host work context parallelism's replacement ops add per block kind (cost facets'
    cp_host), where measured."""
    ctx = Context(job, lay)
    parts = [f"{kind} {host * 1e3:.2f} ms" for kind in layer_kinds(job.model)
             if (host := kinds.facet(kind, "cost").cp_host(ctx)) > 0]
    return [f"context parallelism's own host work (ring pair kernels, chunk-wise scans) per "
            f"block and micro-batch: {', '.join(parts)} (device calibration)"] if parts else []


def differences(job: TrainJob, winner: ParallelPlan, other: ParallelPlan) -> list[str]:
    """The largest ways ``other`` spends more time or memory than ``winner``."""
    w, o = winner.prediction, other.prediction
    out = []
    if o.bubble - w.bubble > 0.01:
        out.append(f"bubble {o.bubble:.0%} vs {w.bubble:.0%}")
    wc, oc = dict(w.exposed_comm), dict(o.exposed_comm)
    extra = sorted(((oc.get(k, 0.0) - wc.get(k, 0.0), k) for k in set(wc) | set(oc)), reverse=True)
    for delta, kind in extra[:2]:
        if delta > 0.01 * w.step_time:
            out.append(f"+{significant(delta)} s exposed {kind} communication")
    if _recompute_share(other) > _recompute_share(winner) + 0.05:
        out.append(f"recomputes {_recompute_share(other):.0%} of its stages in full to fit memory")
    out += topology_facts(job, other.layout, only_bad=True)
    return out


def _recompute_share(plan: ParallelPlan) -> float:
    return sum(s.recompute == "full" for s in plan.stages) / max(1, len(plan.stages))


def why(job: TrainJob, plan: ParallelPlan, ranked: list[ParallelPlan], families: Families) -> list[str]:
    """Lines that say what the plan achieves and why it beats the best plan of another family."""
    p = plan.prediction
    cap = job.cluster.device.memory
    per = device_word(job.cluster.backend)
    lines = [f"step {seconds(p.step_time)} s, {flops_rate(p.tflops_per_gpu * 1e12)} per {per} ({p.mfu:.1%} MFU), "
             f"bubble {p.bubble:.1%}, peak memory {p.peak_memory / GiB:.1f} of {cap / GiB:.0f} GiB"]
    lines += topology_facts(job, plan.layout)
    lines += overlap_facts(job, plan.layout)
    lines.append(optimizer_fact(job))
    lines.append(plan.optimality.line())
    fam = family_of(plan.layout)
    rivals = [r for r in families.records.values()
              if family_of(r.layout) != fam and r.step < float("inf") and r.how != BOUND_ONLY]
    if plan is ranked[0] and rivals:
        best = min(rivals, key=lambda r: (r.step, r.layout.short()))
        reason = families._slower(plan, best)
        lines.append(f"beats the best other mesh ({family_of(best.layout)}): it is {reason}")
    return lines


def no_feasible(job: TrainJob, result) -> str:
    if result.blocked:
        from .runnable import none_runnable
        return none_runnable(job.name, result.blocked)
    cap = job.cluster.device.memory
    if result.min_memory is None:
        return (f"no legal layout for job {job.name!r} on {job.cluster.world} GPUs "
                f"(every mesh breaks a rule; try `plait plan --explain`)")
    need, lay = result.min_memory
    over = need / cap
    hint = (f"more GPUs (about {int(job.cluster.world * over + 0.999)} to spread the parameter "
            f"state), a device with at least {need / GiB:.0f} GiB, a smaller global batch or "
            f"micro-batch, or unpinning dimensions pinned in the job's layout block")
    return (f"no layout fits in memory for job {job.name!r}: the smallest need found is "
            f"{need / GiB:.1f} GiB per GPU ({family_of(lay)}) but the device has "
            f"{cap / GiB:.0f} GiB.\n  hint: {hint}")
