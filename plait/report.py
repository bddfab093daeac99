"""`plait plan JOB --report DIR`: the plan, seen. Four pictures (matplotlib, SVG and PNG) and an
index.html that shows them beside the plan's text:

  schedule    the pipeline schedule as a timeline per rank: forward, backward, recompute,
              exposed communication, bubbles (1F1B, or Megatron's interleaved order with vpp > 1)
  memory      the memory breakdown per pipeline rank against the device's capacity
  candidates  predicted MFU against peak memory for the top plans, the chosen one marked
  ranks       the folded layout as a rank grid: each rank's (tp, cp, dp) and expert (etp, ep, edp)

Every number drawn is written to report.json too (tests check it against the plan JSON).
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

from plait.ir.errors import PlaitError
from plait.ir.job import TrainJob
from plait.ir.plan import ParallelPlan
from plait.planner.cost.evaluate import rank_cost
from plait.planner.cost.pipeline import OPTIONS, CostTable
from plait.planner.groups import groups_over
from plait.planner.layouts import units

GiB = float(2**30)
MARKER = ".plait-report"  # a directory plait wrote; only such a directory is written over
MAX_GRID_RANKS = 256
COLORS = {"forward": "#4c72b0", "backward": "#55a868", "recompute": "#c44e52",
          "communication": "#dd8452", "bubble": "#eeeeee"}
MEMORY_TERMS = ("weights", "gradients", "optimizer", "activations", "buffers", "reserve")


@dataclass(frozen=True)
class Task:
    rank: int
    chunk: int
    micro: int
    kind: str  # forward | backward
    start: float
    parts: tuple[tuple[str, float], ...]  # (forward|backward|recompute|communication, seconds)

    @property
    def end(self) -> float:
        return self.start + sum(s for _, s in self.parts)


def chunk_parts(table: CostTable, plan: ParallelPlan) -> dict[int, dict[str, tuple]]:
    """Per chunk: forward and backward time split into compute, recompute and exposed comm."""
    out = {}
    for c, st in enumerate(sorted(plan.stages, key=lambda s: s.first)):
        opt = OPTIONS.index(st.recompute)
        f = b = rec = comm_f = comm_b = 0.0
        for u in table.units_of(st):
            comm = dict(u.comm)
            total = sum(comm.values())
            f, b, rec = f + u.fwd, b + u.bwd[0], rec + u.bwd[opt] - u.bwd[0]
            # the unit keeps only its exposed total: drawn a third forward, two thirds backward
            comm_f, comm_b = comm_f + total / 3, comm_b + 2 * total / 3
        extra = table.first.time * (c == 0) + table.last.time * (c == table.chunks - 1)
        f, b = f + extra / 3, b + 2 * extra / 3
        out[c] = {"forward": (("forward", max(0.0, f - comm_f)), ("communication", comm_f)),
                  "backward": (("backward", max(0.0, b - comm_b)), ("recompute", rec),
                               ("communication", comm_b + table.chunk_time))}
    return out


def schedule_order(pp: int, vpp: int, m: int, rank: int) -> list[tuple[str, int, int]]:
    """(kind, virtual stage, micro-batch) in the order a rank runs them: 1F1B, or Megatron's
    interleaved order (groups of pp micro-batches per virtual stage)."""
    def seq(backward: bool):
        out = []
        for g in range(0, m, pp):
            for v in (range(vpp - 1, -1, -1) if backward else range(vpp)):
                out += [(v, i) for i in range(g, min(g + pp, m))]
        return out
    fwd, bwd = seq(False), seq(True)
    warm = min(len(fwd), (pp - rank - 1) * 2 + (vpp - 1) * pp if vpp > 1 else pp - rank - 1)
    order = [("forward", *x) for x in fwd[:warm]]
    f, b = warm, 0
    while f < len(fwd) or b < len(bwd):
        if f < len(fwd):
            order.append(("forward", *fwd[f]))
            f += 1
        if b < len(bwd):
            order.append(("backward", *bwd[b]))
            b += 1
    return order


def simulate(table: CostTable, plan: ParallelPlan) -> list[Task]:
    """List scheduling of every rank's order with the pipeline's dependencies: a chunk's forward
    after the previous chunk's, its backward after the next chunk's."""
    lay, m = plan.layout, plan.num_microbatches
    pp, vpp, C = lay.pp, lay.vpp, lay.pp * lay.vpp
    parts = chunk_parts(table, plan)
    orders = {r: schedule_order(pp, vpp, m, r) for r in range(pp)}
    done: dict[tuple, float] = {}
    free = [0.0] * pp
    pos = [0] * pp
    tasks: list[Task] = []
    while any(pos[r] < len(orders[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            if pos[r] >= len(orders[r]):
                continue
            kind, v, i = orders[r][pos[r]]
            c = v * pp + r
            deps = [("forward", c - 1, i)] if kind == "forward" and c else []
            if kind == "backward":
                deps = [("forward", c, i)] + ([("backward", c + 1, i)] if c < C - 1 else [])
            if any(d not in done for d in deps):
                continue
            start = max([free[r]] + [done[d] for d in deps])
            task = Task(r, c, i, kind, start, parts[c][kind])
            done[kind, c, i], free[r] = task.end, task.end
            tasks.append(task)
            pos[r] += 1
            progressed = True
        if not progressed:
            raise PlaitError("the schedule simulation deadlocked (report bug)")
    return tasks


def report_numbers(job: TrainJob, plan: ParallelPlan, candidates: list[ParallelPlan],
                   rejections=()) -> dict:
    """Every number the pictures show."""
    table = CostTable(job, plan.layout, units(job.model))
    tasks = simulate(table, plan)
    busy = {r: sum(t.end - t.start for t in tasks if t.rank == r) for r in range(plan.layout.pp)}
    return {
        "layout": plan.layout.short(), "dp_kind": plan.layout.dp_kind,
        "capacity_gib": job.cluster.device.memory / GiB,
        "memory_gib": [{k: getattr(m, k) / GiB for k in MEMORY_TERMS} for m in
                       plan.prediction.memory],
        "candidates": [{"layout": p.layout.short(), "dp_kind": p.layout.dp_kind,
                        "mfu": p.prediction.mfu, "peak_gib": p.prediction.peak_memory / GiB,
                        "step_time": p.prediction.step_time, "chosen": p is plan}
                       for p in candidates],
        "rejections": [{"family": r.family, "reason": r.reason} for r in rejections],
        "schedule": {"micro_batches": plan.num_microbatches,
                     "rank_seconds_per_step": [busy[r] for r in range(plan.layout.pp)],
                     "rank_seconds_per_micro_batch": [
                         rank_cost(table, plan.stages, r).time for r in range(plan.layout.pp)],
                     "makespan": max(t.end for t in tasks)},
        "tasks": [{"rank": t.rank, "chunk": t.chunk, "micro": t.micro, "kind": t.kind,
                   "start": t.start, "parts": [list(p) for p in t.parts]} for t in tasks],
        "grid": rank_grid(plan),
    }


def rank_grid(plan: ParallelPlan) -> dict:
    """Each rank's coordinates on both sides of the folded layout (the first MAX_GRID_RANKS)."""
    lay = plan.layout
    coords: dict[int, dict] = {}
    for side, dims in (("dense", ("tp", "cp", "dp", "pp")), ("expert", ("tp", "ep", "dp"))):
        for dim in dims:
            name = {"tp": "etp", "dp": "edp"}.get(dim, dim) if side == "expert" else dim
            for group in groups_over(lay, side, (dim,)):
                for i, r in enumerate(group):
                    if r < MAX_GRID_RANKS:
                        coords.setdefault(r, {})[name] = i
    return {"world": lay.world, "shown": min(lay.world, MAX_GRID_RANKS),
            "per_stage": lay.world // lay.pp, "ranks": [coords[r] for r in sorted(coords)]}


# ------------------------------------------------------------------------------------------------
# Pictures and the page
# ------------------------------------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # an optional extra: say how to get it
        raise PlaitError(f"--report needs matplotlib ({e})",
                         hint="pip install 'plait[report]' (make test installs it)") from None
    return plt


def _save(fig, out: Path, name: str) -> list[str]:
    fig.savefig(out / f"{name}.svg")
    fig.savefig(out / f"{name}.png", dpi=110)
    return [f"{name}.svg", f"{name}.png"]


def draw_schedule(plt, numbers: dict, out: Path) -> list[str]:
    tasks, pp = numbers["tasks"], len(numbers["memory_gib"])
    makespan = numbers["schedule"]["makespan"]
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.55 * pp))
    ax.barh(range(pp), [makespan] * pp, color=COLORS["bubble"], height=0.8, label="bubble (idle)")
    for t in tasks:
        x = t["start"]
        for part, sec in t["parts"]:
            if sec > 0:
                ax.barh(t["rank"], sec, left=x, color=COLORS[part], height=0.8, linewidth=0)
                x += sec
    for part in ("forward", "backward", "recompute", "communication"):
        ax.barh([0], [0], color=COLORS[part], label=part)
    ax.set_yticks(range(pp), [f"pp rank {r}" for r in range(pp)])
    ax.invert_yaxis()
    ax.set_xlabel("seconds within one step (pipeline part; DP sync and optimizer not shown)")
    ax.set_title(f"pipeline schedule: {numbers['layout']}, "
                 f"{numbers['schedule']['micro_batches']} micro-batches")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35 if pp < 4 else -0.12), ncol=5,
              frameon=False)
    fig.tight_layout()
    files = _save(fig, out, "schedule")
    plt.close(fig)
    return files


def draw_memory(plt, numbers: dict, out: Path) -> list[str]:
    mem, cap = numbers["memory_gib"], numbers["capacity_gib"]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(mem) + 4), 4.5))
    bottom = [0.0] * len(mem)
    for term in MEMORY_TERMS:
        values = [m[term] for m in mem]
        ax.bar(range(len(mem)), values, bottom=bottom, label=term)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.axhline(cap, color="black", linestyle="--", label=f"capacity {cap:.0f} GiB")
    ax.set_xticks(range(len(mem)), [str(r) for r in range(len(mem))])
    ax.set_xlabel("pipeline rank")
    ax.set_ylabel("GiB per GPU")
    ax.set_title(f"memory per pipeline rank: {numbers['layout']} ({numbers['dp_kind']})")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    files = _save(fig, out, "memory")
    plt.close(fig)
    return files


def draw_candidates(plt, numbers: dict, out: Path) -> list[str]:
    cands = numbers["candidates"]
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, c in enumerate(cands, 1):
        chosen = c["chosen"]
        ax.scatter(c["peak_gib"], 100 * c["mfu"], s=140 if chosen else 60,
                   marker="*" if chosen else "o", color="#c44e52" if chosen else "#4c72b0",
                   zorder=3)
        ax.annotate(f"#{i} {c['layout']} ({c['dp_kind']})" + (" CHOSEN" if chosen else ""),
                    (c["peak_gib"], 100 * c["mfu"]), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    ax.axvline(numbers["capacity_gib"], color="black", linestyle="--", label="capacity")
    ax.set_xlabel("predicted peak memory (GiB per GPU)")
    ax.set_ylabel("predicted MFU (%)")
    ax.set_title("top candidate plans (why the others lost: see the page)")
    ax.legend(frameon=False)
    fig.tight_layout()
    files = _save(fig, out, "candidates")
    plt.close(fig)
    return files


def draw_ranks(plt, numbers: dict, out: Path) -> list[str]:
    grid = numbers["grid"]
    ranks = grid["ranks"]
    cols = min(16, grid["per_stage"], len(ranks))
    rows = -(-len(ranks) // cols)
    fig, ax = plt.subplots(figsize=(1.25 * cols + 1, 0.9 * rows + 1.2))
    cmap = plt.get_cmap("tab20")
    for r, c in enumerate(ranks):
        y, x = divmod(r, cols)
        ax.add_patch(plt.Rectangle((x, -y), 0.95, -0.9, color=cmap(c.get("pp", 0) % 20),
                                   alpha=0.35 + 0.1 * (c.get("dp", 0) % 4)))
        label = f"r{r}\nt{c.get('tp', 0)} c{c.get('cp', 0)} d{c.get('dp', 0)}"
        if "ep" in c:
            label += f"\ne{c['ep']} et{c.get('etp', 0)}"
        ax.text(x + 0.47, -y - 0.45, label, ha="center", va="center", fontsize=6.5)
    ax.set_xlim(0, cols)
    ax.set_ylim(-rows, 0.1)
    ax.axis("off")
    note = "" if grid["shown"] == grid["world"] else f" (first {grid['shown']} of {grid['world']})"
    ax.set_title(f"ranks{note}: colour = pp stage; t/c/d = tp/cp/dp coordinate, "
                 f"e/et = expert ep/etp coordinate", fontsize=9)
    fig.tight_layout()
    files = _save(fig, out, "ranks")
    plt.close(fig)
    return files


def _prepare(out: Path) -> None:
    """Create ``out``; write into an existing one only if plait wrote it (its marker file)."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise PlaitError(f"{out} exists and was not written by `plait plan --report`",
                         hint="name a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by plait plan --report\n")


def write_report(job: TrainJob, plan: ParallelPlan, candidates: list[ParallelPlan], out,
                 rejections=()) -> list[str]:
    """Write the pictures, report.json, plan.json and index.html into ``out``; -> file names."""
    plt = _pyplot()
    out = Path(out)
    _prepare(out)
    numbers = report_numbers(job, plan, candidates, rejections)
    files = []
    for draw in (draw_schedule, draw_memory, draw_candidates, draw_ranks):
        files += draw(plt, numbers, out)
    (out / "report.json").write_text(json.dumps(numbers, indent=1) + "\n")
    (out / "plan.json").write_text(plan.to_json() + "\n")
    (out / "index.html").write_text(_page(job, plan, numbers))
    return files + ["report.json", "plan.json", "index.html"]


def _page(job: TrainJob, plan: ParallelPlan, numbers: dict) -> str:
    e = html.escape
    p = plan.prediction
    why = "".join(f"<li>{e(line)}</li>" for line in plan.explanation)
    stages = "".join(f"<tr><td>{s.pp_rank}</td><td>{s.virtual}</td><td>{s.first}</td>"
                     f"<td>{s.last}</td><td>{e(s.recompute)}</td></tr>" for s in plan.stages)
    lost = "".join(f"<tr><td>{e(r['family'])}</td><td>{e(r['reason'])}</td></tr>"
                   for r in numbers["rejections"])
    prints = ", ".join(f"{k} {v}" for k, v in plan.fingerprints)
    figures = "".join(f'<h2>{t}</h2><img src="{n}.svg" alt="{t}" style="max-width:100%">'
                      for n, t in (("schedule", "Pipeline schedule"), ("memory", "Memory"),
                                   ("candidates", "Candidates"), ("ranks", "Rank grid")))
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>plait plan: {e(job.name)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto}}td,th{{padding:2px 8px;
text-align:left;border-bottom:1px solid #ddd}}</style></head><body>
<h1>{e(job.name)}: {e(plan.layout.short())} ({e(plan.layout.dp_kind)})</h1>
<p>step {p.step_time:.3f} s, {p.tokens_per_s:,.0f} tokens/s, {p.tflops_per_gpu:.0f} TFLOP/s per
GPU, MFU {p.mfu:.1%}, bubble {p.bubble:.1%}, peak memory {p.peak_memory / GiB:.1f} of
{numbers['capacity_gib']:.0f} GiB. {e(plan.optimality.line())}.</p>
<h2>Why this plan</h2><ul>{why}</ul>{figures}
<h2>Stages</h2><table><tr><th>pp rank</th><th>virtual</th><th>first layer</th>
<th>last layer (excl.)</th><th>recompute</th></tr>{stages}</table>
<h2>Why the other families lost</h2><table><tr><th>family</th><th>reason</th></tr>{lost}</table>
<p>inputs: {e(prints)}</p></body></html>
"""
