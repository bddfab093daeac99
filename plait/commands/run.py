"""Execution commands: `plait run`, `plait compile`, `plait data prepare`, and the demo's body."""
from __future__ import annotations

import argparse
import signal
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from rich.table import Table

from plait.cli import arguments, command, console
from plait.ir.dsl import load_job
from plait.ir.errors import LayoutError, PlaitError
from plait.ir.job import TrainJob
from plait.ir.outputs import check_output_dir, claim_output_dir
from plait.ir.precision import PrecisionPolicy
from plait.ir.plan import ParallelPlan

from . import inputs


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="a job spec file (specs/jobs/*.plait)")
    p.add_argument("--name", help="the train job to use when the file declares several")
    p.add_argument("--plan", help="a plan JSON (`plait plan JOB -o plan.json`); default: plan now")
    p.add_argument("--layout", help='pins for planning, e.g. "tp=2 pp=2" (ignored with --plan)')
    p.add_argument("--calibration", metavar="CALIB_JSON",
                   help="plan with cost-model values measured by `plait calibrate`")


def resolve_plan(job: TrainJob, plan_path: Optional[str], layout: Optional[str],
                 calibration_path: Optional[str] = None) -> ParallelPlan:
    """The plan from a file, else the planner's best (pins from the job and --layout, costs from
    the device spec or a `plait calibrate` file), checked against the job before anything
    starts."""
    from plait.planner import calibration
    from plait.runtime.launch import check_plan

    if plan_path:
        if calibration_path:
            raise PlaitError("--calibration has no effect with --plan (the plan is already made)",
                             hint="give one of them")
        plan = read_plan(plan_path, job)
    else:
        planning_job, cal = calibration.calibrated(job, calibration_path)
        plan = calibration.note(_search(planning_job, layout), cal)
    return check_plan(job, plan)


def read_plan(plan_path: str, job: TrainJob) -> ParallelPlan:
    """A plan JSON written by `plait plan -o`, checked to be one and to be for ``job``'s model."""
    path = Path(plan_path)
    if not path.is_file():
        raise PlaitError(f"no plan file at {path}")
    try:
        plan = ParallelPlan.from_json(path.read_text(encoding="utf-8"))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise PlaitError(f"{path} is not a plan JSON ({type(e).__name__}: {e})",
                         hint="write one with `plait plan JOB -o plan.json`") from None
    if plan.model != job.model.name:
        raise PlaitError(f"{path} plans model {plan.model!r}; the job trains {job.model.name!r}")
    return plan


def _search(job: TrainJob, layout: Optional[str]) -> ParallelPlan:
    """The best plan plait's runtime can execute; the better legal plans it cannot run yet are
    named (with the rule that stops each) rather than silently passed over."""
    from plait.planner import explain
    from plait.planner.layouts import parse_layout
    from plait.planner.search import search

    pins = parse_layout(layout) if layout else {}
    pins.setdefault("cp", 1)  # CP only when asked: it pays for long sequences, not local tiny jobs
    res = search(job, pins, top=3, runnable_only=True)
    if res.best is None:
        raise LayoutError(explain.no_feasible(job, res))
    if res.blocked:
        lay = res.best.layout
        console.print(f"running {lay.short()} ({lay.dp_kind}), the best plan plait can run; "
                      "better plans it cannot run yet:\n" + "\n".join(
                          f"  - {b.line(res.best)}" for b in res.blocked),
                      markup=False, highlight=False)
    return res.best


def plan_table(plan: ParallelPlan) -> Table:
    table = Table(title=f"plan for {plan.job}: {plan.layout.short()} "
                        f"({plan.layout.dp_kind}{', sp' if plan.layout.sp else ''})")
    for col in ("pp rank", "virtual", "layers", "recompute"):
        table.add_column(col)
    for s in sorted(plan.stages, key=lambda s: s.first):
        table.add_row(str(s.pp_rank), str(s.virtual), f"{s.first}..{s.last - 1}", s.recompute)
    return table


def _run_args(p: argparse.ArgumentParser) -> None:
    _plan_args(p)
    p.add_argument("--steps", type=int, help="optimizer steps (default: the job's)")
    p.add_argument("--data", help="a dataset directory from `plait data prepare` (\"bundled\": "
                   "the small English corpus shipped with plait, byte tokens)")
    p.add_argument("--synthetic", action="store_true", help="train on seeded random tokens")
    p.add_argument("--weights", help="start from a Hugging Face checkpoint (safetensors file or dir)")
    p.add_argument("--run-dir", help="the run directory: job, plan, options, metrics.jsonl, rank "
                   "logs (default: runs/JOB-TIMESTAMP/)")
    p.add_argument("--save", metavar="DIR", help="write training checkpoints (DCP) under DIR")
    p.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="checkpoint every N steps (and always after the last step)")
    p.add_argument("--async-save", action="store_true",
                   help="write checkpoints in the background (each completes by the next one)")
    p.add_argument("--resume", metavar="DIR", help="continue from the checkpoint in DIR "
                   "(its latest step, written under any plan of this model); --steps stays the "
                   "run's total")
    p.add_argument("--allow-job-change", action="store_true",
                   help="resume although global batch, sequence length, seeds, dataset, optimizer "
                        "or steps differ from the run that wrote the checkpoint")
    p.add_argument("--max-restarts", type=int, default=0, metavar="N",
                   help="restart the ranks up to N times after a failure (torchrun elastic), "
                        "each time from the newest checkpoint under --save")
    p.add_argument("--print-launch", nargs="?", const="torchrun", choices=["torchrun", "slurm"],
                   help="write the run directory and print the command each node runs "
                        "(torchrun), or write RUN_DIR/launch.sbatch (slurm), instead of running")


BUNDLED = "bundled"  # --data bundled: the corpus shipped with plait, asked for by name


def with_data(job: TrainJob, data: Optional[str], synthetic: bool) -> TrainJob:
    if synthetic:  # a flag replaces the job's data, a blend included
        return replace(job, data=replace(job.data, synthetic=True, path=None, sources=(), phases=()))
    if data == BUNDLED:  # resolve_data prepares it into the run directory
        return replace(job, data=replace(job.data, synthetic=False, path=None, sources=(), phases=()))
    if data:
        return replace(job, data=replace(job.data, synthetic=False, path=data, sources=(), phases=()))
    return job


@command("run", help="train a job: plan (or read --plan), compile per rank, start the ranks")
@arguments(_run_args)
def run(args: argparse.Namespace) -> int:
    from plait.runtime.launch import Checkpointing, check_restarts
    from plait.runtime.prelaunch import check_inputs

    check_run_args(args)
    job = with_data(load_job(args.job, args.name), args.data, args.synthetic)
    PrecisionPolicy.of(job).check_runnable()  # an fp8 recipe only the export knows: say so now
    ckpt = Checkpointing(save=args.save, every=args.save_every, resume=args.resume,
                         asynchronous=args.async_save, allow_job_change=args.allow_job_change)
    check_restarts(args.max_restarts, ckpt)
    check_inputs(job, args.weights, bundled=args.data == BUNDLED)
    plan = resolve_plan(job, args.plan, args.layout, args.calibration)
    run_dir = Path(args.run_dir or default_run_dir(job))
    if args.print_launch or job.cluster.nodes > 1:
        return print_launch(job, plan, run_dir, args, ckpt)
    console.print(plan_table(plan))
    if args.calibration:
        console.print(plan.explanation[0], markup=False, highlight=False)
    claim_output_dir(run_dir, RUN_DIR_KIND)
    return train_locally(job, plan, args.steps, run_dir, args.weights, ckpt, args.max_restarts)


def default_run_dir(job: TrainJob) -> Path:
    """runs/<job>-<timestamp>/ under the working directory (kept: it is the run's record)."""
    return Path("runs") / f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def print_launch(job: TrainJob, plan: ParallelPlan, run_dir: Path, args, ckpt) -> int:
    """Write the run directory a cluster launch reads and print how to start it on every node."""
    from plait.runtime.cluster_launch import SBATCH, node_instructions, slurm_script
    from plait.runtime.launch import check_resume, resolve_data, run_options, write_run_dir

    check_resume(job, plan, ckpt, args.steps)
    check_output_dir(run_dir, RUN_DIR_KIND)
    claim_output_dir(run_dir, RUN_DIR_KIND)
    job = resolve_data(job, run_dir.resolve())
    write_run_dir(job, plan, run_dir, **run_options(job, args.steps, args.weights, ckpt,
                                                    max_restarts=args.max_restarts))
    if args.print_launch == "slurm":
        script = run_dir / SBATCH
        script.write_text(slurm_script(job, run_dir, args.max_restarts))
        print(f"# wrote {script}: submit it with `sbatch {script}`\n" + script.read_text())
        return 0
    if not args.print_launch:
        console.print(f"cluster {job.cluster.name!r} has {job.cluster.nodes} nodes: start the run "
                      "on each of them (or `--print-launch slurm` for an sbatch script)")
    print(node_instructions(job, run_dir.resolve(), run_dir.name, args.max_restarts))
    return 0


RUN_DIR_KIND = "run directory"


def check_run_args(args: argparse.Namespace) -> None:
    """Every path and number `plait run` was given, checked before planning or training."""
    inputs.at_least(args.steps, 1, "--steps")
    inputs.at_least(args.save_every, 0, "--save-every")
    if (args.save_every or args.async_save) and not args.save:
        raise PlaitError(f"{'--save-every' if args.save_every else '--async-save'} needs --save DIR")
    if args.allow_job_change and not args.resume:
        raise PlaitError("--allow-job-change needs --resume DIR")
    if args.plan and args.layout:
        raise PlaitError("--layout has no effect with --plan", hint="give one of them")
    if args.data and args.synthetic:
        raise PlaitError("--data and --synthetic exclude each other", hint="give one of them")
    if args.save:
        inputs.writable_dir(args.save, "--save")
    if args.resume:
        inputs.existing_dir(args.resume, "--resume")
    if args.weights:
        inputs.safetensors_source(args.weights)
    if args.run_dir:
        check_output_dir(args.run_dir, RUN_DIR_KIND)


def train_locally(job: TrainJob, plan: ParallelPlan, steps: Optional[int],
                  run_dir: Optional[str | Path], weights: Optional[str] = None,
                  ckpt: Optional["Checkpointing"] = None, max_restarts: int = 0) -> int:
    """Start the ranks here; on failure, one summary (first failing rank, its error, its log)
    instead of every traceback. Without ``run_dir`` (the demo), a temporary one."""
    from plait.runtime.launch import Checkpointing, launch_local, resolve_data
    from plait.runtime.train import NON_FINITE_EXIT

    with tempfile.TemporaryDirectory(prefix="plait-run-") as tmp:
        where = Path(run_dir) if run_dir else Path(tmp)
        job = resolve_data(job, where)
        if run_dir:
            console.print(f"run directory {where}/ (metrics.jsonl, rank-N.log)")
        start = time.perf_counter()
        status = launch_local(job, plan, where, steps, weights=weights,
                              ckpt=ckpt or Checkpointing(), max_restarts=max_restarts)
        took = time.perf_counter() - start
        if status == NON_FINITE_EXIT:
            raise PlaitError("training stopped: a step's loss or gradient norm was not finite "
                             f"(see {where / 'rank-0.log'}); checkpoints written before it are "
                             "kept")
        if status > 128 and status - 128 in (signal.SIGINT, signal.SIGTERM):
            raise PlaitError(f"stopped by {signal.Signals(status - 128).name} after {took:.1f} s; "
                             "every rank and torchrun ended" + _saved_note(where))
        if status != 0:
            from plait.runtime.failures import summary
            raise PlaitError(f"training failed after {took:.1f} s (torchrun exit status "
                             f"{status}):\n{summary(where, plan.world)}")
        console.print(f"{plan.world} ranks finished in {took:.1f} s")
    return 0


def _saved_note(run_dir: Path) -> str:
    from plait.runtime.failures import read_states

    saved = {s.get("saved") for s in read_states(run_dir) if s.get("saved")}
    return f"; checkpoint {saved.pop()}" if len(saved) == 1 else ""


def _compile_args(p: argparse.ArgumentParser) -> None:
    _plan_args(p)
    p.add_argument("-o", "--output", required=True, help="directory for the per-rank programs")
    p.add_argument("--ranks", help="comma-separated ranks to compile (default: all)")


@command("compile", help="lower a job's plan to readable per-rank stage programs")
@arguments(_compile_args)
def compile_command(args: argparse.Namespace) -> int:
    from plait.lowering.compile import lower, write_programs

    if args.plan and args.layout:
        raise PlaitError("--layout has no effect with --plan", hint="give one of them")
    check_output_dir(args.output, COMPILED_KIND)
    job = load_job(args.job, args.name)
    plan = resolve_plan(job, args.plan, args.layout, args.calibration)
    ranks = _ranks(args.ranks, plan.world)
    programs = [lower(_meta_model(job), job.model, plan, r) for r in ranks]
    claim_output_dir(args.output, COMPILED_KIND)
    files = write_programs(programs, args.output)
    console.print(plan_table(plan))
    console.print(f"wrote {len(files)} files to {args.output}/ (plan.json, rank*/stage*.py, "
                  "rank*/loss.py, rank*/shards.json)")
    return 0


COMPILED_KIND = "compiled program directory"


def _ranks(text: Optional[str], world: int) -> list[int]:
    """`--ranks 0,3`: distinct ranks of the plan's world, in the order given."""
    if not text:
        return list(range(world))
    try:
        ranks = [int(r) for r in text.split(",")]
    except ValueError:
        raise PlaitError(f"--ranks {text!r}: write comma-separated rank numbers, e.g. 0,3") from None
    bad = [r for r in ranks if not 0 <= r < world]
    if bad:
        raise PlaitError(f"--ranks {text!r}: {bad[0]} is not a rank of this plan (0..{world - 1})")
    return list(dict.fromkeys(ranks))


def _meta_model(job: TrainJob):
    """The reference model without storage: programs are code and shapes, so any model size
    compiles on a laptop."""
    import torch
    from plait.lowering.build import build_model

    with torch.device("meta"):
        return build_model(job.model, device="meta", seed=job.seed)


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["prepare", "inspect"],
                   help="prepare: tokenize text / JSONL files; inspect: describe a dataset")
    p.add_argument("files", nargs="+", help="prepare: text or JSONL files (\"bundled\" = the "
                   "shipped corpus); inspect: a dataset directory or Megatron PREFIX")
    p.add_argument("-o", "--output", help="dataset directory to write (prepare)")
    p.add_argument("--tokenizer", default="byte", help="byte (default) or a HF tokenizer name/path")
    p.add_argument("--field", default=None, help="the JSONL field holding the text (default "
                   "text; with --chat: messages)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--chat", action="store_true", help="JSONL conversations rendered with the "
                   "tokenizer's chat template, with an SFT loss mask on the assistant turns "
                   "(train with objective = sft)")


@command("data", help="datasets: `plait data prepare FILES -o DATASET`, `plait data inspect DATASET`")
@arguments(_data_args)
def data(args: argparse.Namespace) -> int:
    from plait.runtime.data import bundled_corpus, prepare
    from plait.runtime.data_inspect import inspect_table

    if args.action == "inspect":
        for path in args.files:
            console.print(inspect_table(path))
        return 0
    if not args.output:
        raise PlaitError("prepare needs an output directory", hint="add -o DIR")
    files = [bundled_corpus() if f == "bundled" else Path(f) for f in args.files]
    field = args.field or ("messages" if args.chat else "text")
    meta = prepare(files, args.output, args.tokenizer, field, max(1, args.workers),
                   show_progress=console.is_terminal, chat=args.chat)
    console.print(f"{args.output}: {meta['num_tokens']:,} tokens in {meta['documents']:,} documents "
                  f"({meta['tokenizer']} tokenizer, vocab {meta['vocab']}, {meta['dtype']})")
    return 0


DEMO_LAYOUT = "tp=2 pp=2"  # dp = 8 / (tp*pp) = 2: every kind of parallelism at once
DEMO_STEPS = 50


def run_demo(job: TrainJob, steps: int = DEMO_STEPS) -> int:
    """`plait demo`: plan the tiny job on 8 local ranks with TP, PP and DP all > 1, then train it
    on the bundled corpus with a falling loss."""
    job = replace(job, data=replace(job.data, synthetic=False, path=None), steps=steps)
    plan = resolve_plan(job, None, DEMO_LAYOUT)
    console.print(plan_table(plan))
    for line in plan.explanation[:6]:
        console.print(f"  {line}")
    return train_locally(job, plan, steps, None)
