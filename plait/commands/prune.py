"""`plait prune JOB [--plan-only]`: compress a trained model to a budget (structured pruning chosen
by an ILP over importance scores, sliced weights, distillation)."""
from __future__ import annotations

import json
import time

from plait.cli import arguments, command, console
from plait.ir.dsl import load_prune_job
from plait.ir.job import PruneJob
from plait.ir.model import ModelSpec
from plait.ir.plan import PruneCandidate

from . import inputs


def _args(p):
    p.add_argument("job", help="a spec file with a prune declaration")
    p.add_argument("--name", help="the prune job to run when the file declares several")
    p.add_argument("--plan-only", action="store_true", help="rank candidates; touch no weights")
    p.add_argument("--top", type=int, default=5, help="how many ranked candidates to show (default 5)")
    p.add_argument("--out", help="run directory (default: the job's output, else runs/<job>)")
    p.add_argument("--fresh", action="store_true",
                   help="start over: delete the run directory first (only one plait created)")
    p.add_argument("--steps", type=int, help="distillation steps (default: the job's)")
    p.add_argument("--json", action="store_true", help="print the plan (or report) as JSON")
    p.add_argument("--train-teacher", type=int, metavar="STEPS",
                   help="first train the source model from scratch for STEPS steps and save it as the "
                        "job's weights (for demos without a trained checkpoint)")


@command("prune", help="prune a model to a budget: plan (ILP) -> slice weights -> distill")
@arguments(_args)
def prune(args) -> int:
    start = time.perf_counter()
    inputs.at_least(args.top, 1, "--top")
    inputs.at_least(args.steps, 0, "--steps")
    inputs.at_least(args.train_teacher, 1, "--train-teacher")
    job = load_prune_job(args.job, args.name)
    if args.plan_only:
        from plait.pruning import plan_only
        result = plan_only(job, top=args.top)
        if args.json:
            print(result.plan.to_json())
            return 0
        show_candidates(job, result.plan.candidates)
        for note in result.notes:
            console.print(f"  note: {note}", highlight=False)
        console.print(f"importance: {result.plan.importance}"
                      + (" (no weights read: every channel counts the same)" if result.plan.importance == "uniform"
                         else ""), highlight=False)
        console.print(f"planned in {result.seconds:.2f} s ({result.solves} ILP solves over {result.options} "
                      f"options; {time.perf_counter() - start:.2f} s with loading)", highlight=False)
        return 0
    if args.train_teacher is not None:
        from plait.pruning import train_teacher
        train_teacher(job, args.train_teacher, say=lambda t: console.print(t, highlight=False), out=args.out,
                      fresh=args.fresh)
        args.fresh = False  # the run directory was just started over
    return _run(job, args)


def _run(job: PruneJob, args) -> int:
    from plait.pruning import run_prune

    def say(text: str) -> None:
        console.print(text, highlight=False)

    def on_step(log) -> None:
        if log.step % 10 == 0:
            say(f"distill step {log.step:4d}  loss {log.loss:.4f}  kl {log.kl:.4f}  lm {log.lm:.4f}  "
                f"lr {log.lr:.2e}  {log.tokens_per_s:,.0f} tok/s")

    report = run_prune(job, out=args.out, fresh=args.fresh, top=args.top, steps=args.steps, say=say,
                       on_step=on_step)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    say(f"params {report['params_before']:,} -> {report['params_after']:,}; held-out loss: teacher "
        f"{report['teacher_loss']:.4f}, pruned {report['pruned_loss']:.4f}"
        + (f", distilled {report['distilled_loss']:.4f}" if "distilled_loss" in report else ""))
    say(f"run directory: {report['run']}")
    return 0


def widths_text(m: ModelSpec) -> str:
    """`hidden 2560, ffn 18432, heads 32/8kv, mamba 112x64`: the prunable widths of a model."""
    parts = [f"hidden {m.hidden}"]
    if m.mlp is not None:
        parts.append(f"ffn {m.mlp.ffn}")
    if m.attention is not None:
        parts.append(f"heads {m.attention.heads}/{m.attention.kv_heads}kv")
    if m.mamba is not None:
        parts.append(f"mamba {m.mamba.heads}x{m.mamba.head_dim}")
    if m.moe is not None:
        parts.append(f"experts {m.moe.experts}")
    return ", ".join(parts)


def _layers(c: PruneCandidate) -> str:
    return " ".join(f"{c.model.count(k)} {k}" for k in dict.fromkeys(c.model.layers))


def _billions(n: float) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n:,.0f}"


def candidate_lines(job: PruneJob, candidates) -> list[str]:
    """The ranked candidates as plain text: one summary line, one line of what each axis keeps."""
    from plait.ir import counts

    source = counts.params(job.model)
    lines = [f"prune {job.name}: {job.model.name}, {_billions(source.total)} params -> "
             f"{len(candidates)} ranked candidates", ""]
    head = f"{'#':>2}  {'params':>11}  {'active':>11}  {'weights':>10}  {'tokens/s':>10}  {'retained':>8}  widths | layers"
    lines += [head, "-" * len(head)]
    for i, c in enumerate(candidates, 1):
        tput = f"{c.tokens_per_s:,.0f}" if c.tokens_per_s else "-"
        lines.append(f"{i:>2}  {_billions(c.params):>11}  {_billions(c.active_params):>11}  "
                     f"{c.weight_bytes / 2**30:>6.2f} GiB  {tput:>10}  {c.score:>8.4f}  {widths_text(c.model)} | {_layers(c)}")
        kept = ", ".join(f"{a} {f:.3f}" for a, f in c.retained if f < 1.0) or "everything"
        lines.append(f"{'':>2}  retains {kept}" + (f"; planned as {c.layout}" if c.layout else ""))
    return lines


def show_candidates(job: PruneJob, candidates) -> None:
    for line in candidate_lines(job, candidates):
        console.print(line, highlight=False)
