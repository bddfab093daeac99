"""Planner commands: `plait plan`, `plait estimate`, `plait groups`, `plait export megatron`."""
from __future__ import annotations

import json
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from plait.cli import arguments, command, console
from plait.ir.dsl import load_job
from plait.ir.errors import LayoutError, PlaitError
from plait.ir.legality import RUNNABLE
from plait.ir.plan import Layout, ParallelPlan
from plait.ir.precision import PrecisionPolicy
from plait.planner import calibration, explain
from plait.planner.cost.uncertainty import band as step_band
from plait.planner.groups import rank_groups
from plait.planner.layouts import check_pins, job_pins, parse_layout, violations
from plait.planner.search import search
from plait.planner.wording import device_word, flops_rate, seconds

from . import inputs
from .export_hf import export_hf_command, hf_args
from .megatron import megatron_command

GiB = float(2**30)


def _job_args(p):
    p.add_argument("job", help="a job spec file (specs/jobs/*.plait)")
    p.add_argument("--name", help="the train job to plan when the file declares several")


def _plan_table(plans: list[ParallelPlan], title: str = "candidate plans (best first)",
                per: str = "GPU") -> Table:
    t = Table(title=title)
    for col in ("#", "layout", "dp", "recompute", "step s", "tokens/s", f"per {per}", "MFU",
                "bubble", "peak GiB"):
        t.add_column(col, justify="right" if col not in ("layout", "dp", "recompute") else "left",
                     no_wrap=col == "layout")
    for i, plan in enumerate(plans, 1):
        p, lay = plan.prediction, plan.layout
        recompute = ",".join(sorted({s.recompute for s in plan.stages}))
        t.add_row(str(i), lay.short(), lay.dp_kind, recompute, seconds(p.step_time),
                  f"{p.tokens_per_s:,.0f}", flops_rate(p.tflops_per_gpu * 1e12), f"{p.mfu:.1%}",
                  f"{p.bubble:.1%}", f"{p.peak_memory / GiB:.1f}")
    return t


def calibration_arg(p) -> None:
    p.add_argument("--calibration", metavar="CALIB_JSON",
                   help="cost-model values measured by `plait calibrate` (override the device "
                        "spec's; the explanation names them)")


def precision_table(job, plan: ParallelPlan) -> Table:
    """What each pipeline stage computes in: the policy's dtype and, under fp8, which layers'
    linears keep bf16 (what the cost model charged and what `plait run` lowers)."""
    policy = PrecisionPolicy.of(job)
    t = Table(title=f"precision per stage ({policy.kind}: fp32 main weights, grads, Adam)"
              if policy.mixed else "precision per stage")
    for col in ("stage", "layers", "precision"):
        t.add_column(col)
    for st in plan.stages:
        t.add_row(f"pp{st.pp_rank}" + (f".v{st.virtual}" if plan.layout.vpp > 1 else ""),
                  f"{st.first}-{st.last - 1}", policy.describe(st.first, st.last))
    return t


def _run_search(job, extra, top, cal=None, runnable_only=False):
    with Progress(TextColumn("searching meshes"), BarColumn(), TextColumn("{task.completed}/"
                  "{task.total}"), TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("search", total=None)
        res = search(job, extra, top=top, runnable_only=runnable_only,
                     progress=lambda done, total: bar.update(task, completed=done, total=total))
    if res.best is None:
        raise LayoutError(explain.no_feasible(job, res))
    res.plans = [calibration.note(p, cal) for p in res.plans]
    return res


@command("plan", help="search the best parallel plan for a job")
@arguments(lambda p: (_job_args(p),
                      p.add_argument("--layout", default="", help='pin dimensions: "tp=2 ep=8"'),
                      p.add_argument("--top", type=int, default=5,
                                     help="how many candidate plans to list (default 5)"),
                      p.add_argument("--explain", action="store_true",
                                     help="list each rejected family with its reason, and the "
                                          "better plans plait cannot run yet"),
                      p.add_argument("--legal", action="store_true",
                                     help="rank every legal plan (Megatron's rules), also those "
                                          "plait's runtime cannot execute yet"),
                      p.add_argument("-o", "--output", help="write the best plan as JSON"),
                      p.add_argument("--report", metavar="DIR",
                                     help="write pictures of the plan and an index.html to DIR"),
                      calibration_arg(p)))
def plan_cmd(args) -> int:
    inputs.at_least(args.top, 1, "--top")
    if args.output:  # checked before the search: never replace a file that is not a plan
        inputs.replaceable_file(args.output, "-o", _is_plan_json)
    if args.report:
        _check_report_dir(Path(args.report))
    job, cal = calibration.calibrated(load_job(args.job, args.name), args.calibration)
    res = _run_search(job, parse_layout(args.layout), args.top, cal, runnable_only=not args.legal)
    console.print(_plan_table(res.plans, per=device_word(job.cluster.backend)))
    console.print(f"[bold]why {res.best.layout.short()} wins:[/bold]")
    for line in res.best.explanation:
        console.print(f"  - {line}", markup=False, highlight=False)
    if args.explain:  # how sure: the step over the range of every value nobody measured here
        console.print(f"  - {_band(job, res.best, cal).line()}", markup=False, highlight=False)
    console.print(f"searched {res.enumerated} layouts: {res.pruned} pruned by bounds, {res.solved} "
                  f"stage partitions solved, in {res.seconds:.2f} s", highlight=False)
    if args.explain:
        t = Table(title="rejected families")
        t.add_column("family")
        t.add_column("why not")
        for rej in res.rejections:
            t.add_row(rej.family, rej.reason)
        console.print(t)
        _print_blocked(res)
        console.print(precision_table(job, res.best))
        _print_folding(res)
    if args.output:
        Path(args.output).write_text(res.best.to_json() + "\n")
        console.print(f"wrote {args.output}")
    if args.report:
        from plait.report import write_report
        write_report(job, res.best, res.plans, args.report, res.rejections)
        console.print(f"wrote {Path(args.report) / 'index.html'}")
    return 0


def _check_report_dir(out: Path) -> None:
    """Before the search: the report directory is new, empty or an earlier report (its marker)."""
    from plait.report import MARKER

    if out.exists() and not out.is_dir():
        raise PlaitError(f"--report {out} is a file, not a directory", hint="name a new directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise PlaitError(f"--report {out} is not empty and was not written by `plait plan --report`",
                         hint="name a new or empty directory")


def _is_plan_json(text: str) -> bool:
    try:
        ParallelPlan.from_json(text)
    except (ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


def _print_blocked(res) -> None:
    """The better-ranked legal plans plait's runtime cannot execute yet, and the row that stops
    each (runnable-only searches)."""
    if not res.runnable_only:
        return
    if not res.blocked:
        console.print("no better legal plan is blocked by what plait's runtime can execute")
        return
    t = Table(title="better plans plait cannot run yet")
    for col in ("layout", "dp", "step s", "rule", "why not"):
        t.add_column(col, no_wrap=col == "layout")
    for b in res.blocked:
        lay = b.plan.layout
        t.add_row(lay.short(), lay.dp_kind, seconds(b.plan.prediction.step_time), b.rule, b.reason)
    console.print(t)


def _print_folding(res) -> None:
    """MoE: the winner next to the best unfolded plan (ETP = TP, EP inside DP) and the gain."""
    if res.folding is None:
        return
    if res.unfolded is not None:
        console.print(_plan_table([res.best, res.unfolded],
                                  "folded winner vs best unfolded layout (ETP = TP, EP inside DP)"))
    console.print(res.folding, markup=False, highlight=False)


@command("estimate", help="predict one fixed layout (searching only what it leaves open)")
@arguments(lambda p: (_job_args(p),
                      p.add_argument("--layout", required=True,
                                     help='e.g. "tp=2 pp=8 ep=8 etp=1 mbs=1 recompute=selective"'),
                      p.add_argument("--json", action="store_true", help="print the plan JSON"),
                      calibration_arg(p)))
def estimate_cmd(args) -> int:
    job, cal = calibration.calibrated(load_job(args.job, args.name), args.calibration)
    res = _run_search(job, parse_layout(args.layout), 1, cal)
    band = _band(job, res.best, cal)
    if args.json:  # the plan (readable back by `--plan`) and its band
        print(json.dumps({**json.loads(res.best.to_json()), "uncertainty": band.to_dict()},
                         indent=2))
    else:
        console.print(_plan_table(res.plans, per=device_word(job.cluster.backend)))
        if cal:
            console.print(calibration.explanation(cal), markup=False, highlight=False)
        console.print(band.line(), markup=False, highlight=False)
        for problem in violations(job, res.best.layout, levels=(RUNNABLE,)):
            console.print(f"note: Megatron's rules allow this layout, but plait cannot run it yet: "
                          f"{problem}", markup=False, highlight=False)
    return 0


def _band(job, plan: ParallelPlan, cal):
    """The plan's step-time band; the keys ``cal`` measured get a measurement's tolerance."""
    return step_band(job, plan, calibration.measured_keys(cal))


def layout_from_pins(job, pins: dict) -> Layout:
    """A complete layout from pins: open sizes are 1, dp and edp fill the world."""
    check_pins(job, pins)
    world = job.cluster.world
    tp, cp, pp = (pins.get(k, 1) for k in ("tp", "cp", "pp"))
    dp = pins.get("dp", world // (tp * cp * pp))
    etp = pins.get("etp", 1 if job.model.is_moe else tp)
    ep = pins.get("ep", 1)
    edp = pins.get("edp", tp * cp * dp // (etp * ep))
    rest = {k: pins[k] for k in ("vpp", "mbs", "dp_kind", "recompute", "dispatcher", "order")
            if k in pins}
    lay = Layout(tp=tp, cp=cp, dp=dp, pp=pp, etp=etp, ep=ep, edp=edp, sp=pins.get("sp", tp > 1),
                 **rest)
    bad = violations(job, lay, skip=("batch",))  # process groups do not depend on the batch
    if bad:
        raise LayoutError(f"layout {lay.short()} is not legal:\n  - " + "\n  - ".join(bad))
    return lay


@command("groups", help="print the process groups of a layout as JSON")
@arguments(lambda p: (_job_args(p), p.add_argument("--layout", required=True,
                                                    help='the layout, e.g. "tp=2 cp=2 pp=2 ep=4 etp=1"')))
def groups_cmd(args) -> int:
    job = load_job(args.job, args.name)
    lay = layout_from_pins(job, job_pins(job, parse_layout(args.layout)))
    print(json.dumps(rank_groups(lay)))
    return 0


def _export_args(p) -> None:
    p.add_argument("format", choices=["megatron", "hf"],
                   help="megatron: a Megatron-LM pretrain_gpt.py / pretrain_hybrid.py command; "
                        "hf: a training checkpoint (JOB = CKPT) as a Hugging Face model directory")
    _job_args(p)
    hf_args(p)
    p.add_argument("--plan", help="a plan JSON from `plait plan JOB -o plan.json` (default: plan now)")
    p.add_argument("--layout", help='pins for planning now, e.g. "tp=2 pp=4" (not with --plan)')


@command("export", help="megatron: the command that trains a job under a plan in Megatron-LM; "
                         "hf: a checkpoint as a Hugging Face model")
@arguments(_export_args)
def export_cmd(args) -> int:
    from .run import read_plan

    if args.format == "hf":
        return export_hf_command(args)
    if args.job.endswith(".json"):
        raise PlaitError(f"{args.job} looks like a plan; the export also needs the job spec (the model's "
                         "dimensions, the optimizer, the data)",
                         hint=f"plait export megatron JOB.plait --plan {args.job}")
    if args.plan and args.layout:
        raise PlaitError("--layout has no effect with --plan", hint="give one of them")
    job = load_job(args.job, args.name)
    plan = read_plan(args.plan, job) if args.plan else _run_search(job, parse_layout(args.layout or ""), 1).best
    command = megatron_command(plan, job)
    print(command.shell(job.cluster.nodes, job.cluster.gpus_per_node))
    return 0
