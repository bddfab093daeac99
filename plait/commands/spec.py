"""Spec commands: `plait show`, `plait fmt`, `plait check`, `plait demo`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from rich.table import Table

from plait.cli import arguments, command, console
from plait.ir import counts
from plait.ir.dsl import Library, load_file
from plait.ir.dsl.fmt import format_file, format_library
from plait.ir.errors import SpecError
from plait.ir.job import Precision, TrainJob
from plait.ir.model import ModelSpec

from . import inputs

DEFAULT_SEQ_LEN = 4096  # for a bare model file; a job file uses its job's seq_len
DEMO_JOB = "jobs/tiny-local.plait"


def specs_dir() -> Path:
    """The spec library: `specs/` of the source tree plait runs from, else of the working directory."""
    here = Path(__file__).resolve().parents[2] / "specs"
    return here if here.is_dir() else Path.cwd() / "specs"


def _target(lib: Library, name: Optional[str]) -> tuple[ModelSpec, Optional[TrainJob]]:
    """The model to show: the named (or only) job's model, else the named (or only) model."""
    own_jobs = [n for k, n in lib.own if k == "train"]
    own_models = [n for k, n in lib.own if k == "model"]
    if name is not None:
        if name in lib.jobs:
            return lib.jobs[name].model, lib.jobs[name]
        if name in lib.models:
            return lib.models[name], None
        raise SpecError(f'no model or train job named "{name}"', file=lib.file)
    if len(own_jobs) == 1 and not own_models:
        job = lib.jobs[own_jobs[0]]
        return job.model, job
    candidates = own_models or list(lib.models)
    if len(candidates) == 1:
        return lib.models[candidates[0]], None
    if not (own_jobs or own_models):
        raise SpecError("the file declares no model or train job", file=lib.file)
    raise SpecError(f"the file declares several models or jobs ({', '.join(own_jobs + own_models)})",
                    file=lib.file, hint="pick one with --name")


def model_report(model: ModelSpec, seq_len: int, precision: Precision, job: Optional[TrainJob] = None) -> dict:
    """Parameter, FLOP and byte counts of ``model`` (all from ir/counts.py) as plain data."""
    p = counts.params(model)
    state = counts.param_state_bytes(precision, "replicated")
    report = {
        "model": model.name, "layers": model.num_layers, "decoder_layers": decoder_layers(model),
        "hidden": model.hidden, "vocab": model.vocab,
        "params_total": p.total, "params_active": p.active, "params_embedding": p.embedding,
        "params_head": p.head, "params_per_kind": dict(p.per_kind),
        "layers_per_kind": {k: model.count(k) for k, _ in p.per_kind},
        "seq_len": seq_len,
        "flops_per_token": counts.flops_per_token(model, seq_len, training=True),
        "flops_per_token_forward": counts.flops_per_token(model, seq_len, training=False),
        "precision": precision.kind,
        "bytes": {k: state[k] * p.total for k in ("weights", "grads", "optimizer", "total")},
    }
    if job is not None:
        report["job"] = {"name": job.name, "cluster": job.cluster.name, "gpus": job.cluster.world,
                         "global_batch": job.global_batch, "tokens_per_step": job.tokens_per_step}
    return report


def decoder_layers(model: ModelSpec) -> Optional[int]:
    """Decoder layers as Hugging Face and Megatron count them (attention + MLP or MoE) when the
    model is built of such pairs; None for hybrid models, whose every block is a layer there too."""
    return model.decoder_layers


def _layers_text(r: dict) -> str:
    if r.get("decoder_layers"):
        return f"{r['layers']} layers ({r['decoder_layers']} decoder layers of attention + MLP/MoE)"
    return f"{r['layers']} layers"


def _count(n: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n:g}"


def _flops(n: float) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {prefix}FLOP"
    return f"{n:g} FLOP"


def _bytes(n: float) -> str:
    for scale, suffix in ((2 ** 40, "TiB"), (2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n:g} B"


def report_table(r: dict) -> Table:
    title = f"{r['model']}: {_layers_text(r)}, hidden {r['hidden']}, vocab {r['vocab']}"
    if "job" in r:
        j = r["job"]
        title = (f"job {j['name']} on {j['cluster']} ({j['gpus']} devices, global batch {j['global_batch']})\n"
                 + title)
    table = Table(title=title, title_justify="left")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("exact", justify="right")
    for label, key in (("parameters", "params_total"), ("active per token", "params_active"),
                       ("embedding", "params_embedding"), ("output head", "params_head")):
        table.add_row(label, _count(r[key]), f"{r[key]:,}")
    for kind, n in r["params_per_kind"].items():
        table.add_row(f"  {kind} x {r['layers_per_kind'][kind]}", _count(n), f"{n:,}")
    table.add_section()
    table.add_row(f"FLOPs / token, training (seq {r['seq_len']})", _flops(r["flops_per_token"]),
                  f"{r['flops_per_token']:.6g}")
    table.add_row("FLOPs / token, forward", _flops(r["flops_per_token_forward"]),
                  f"{r['flops_per_token_forward']:.6g}")
    table.add_section()
    for key in ("weights", "grads", "optimizer", "total"):
        n = r["bytes"][key]
        table.add_row(f"{key} ({r['precision']}, unsharded)", _bytes(n), f"{n:,.0f} B")
    return table


@command("show", help="parameters, FLOPs per token and state bytes of a model or job spec")
@arguments(lambda p: (
    p.add_argument("file", help="a model or job spec file"),
    p.add_argument("--name", help="the model or job to show when the file declares several"),
    p.add_argument("--seq-len", type=int, help=f"sequence length (default: the job's, else {DEFAULT_SEQ_LEN})"),
    p.add_argument("--json", action="store_true", help="print JSON instead of a table"),
))
def show(args) -> int:
    inputs.at_least(args.seq_len, 1, "--seq-len")
    model, job = _target(load_file(args.file), args.name)
    seq_len = args.seq_len or (job.seq_len if job else min(model.max_seq or DEFAULT_SEQ_LEN, DEFAULT_SEQ_LEN))
    report = model_report(model, seq_len, job.precision if job else Precision(), job)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        console.print(report_table(report))
    return 0


@command("fmt", help="print a spec file in canonical form")
@arguments(lambda p: (
    p.add_argument("file", help="a spec file (comments and `use` lines are kept)"),
    p.add_argument("--all", action="store_true",
                   help="include everything the file `use`s, as one self-contained spec"),
))
def fmt(args) -> int:
    lib = load_file(args.file)
    print(format_library(lib) if args.all else format_file(lib), end="")
    return 0


@command("check", help="validate spec files (syntax, references, units, architecture checks)")
@arguments(lambda p: p.add_argument("files", nargs="+", help="spec files (each with everything it `use`s)"))
def check(args) -> int:
    for path in args.files:
        lib = load_file(path)
        print(f"ok: {lib.summary()} ({path})")
        for job in lib.jobs.values():
            if job.data.sources:
                console.print(blend_table(job))
    return 0


def blend_table(job) -> Table:
    """The resolved data recipe: per phase and source, the samples, tokens and epochs it draws."""
    from plait.ir.datarecipe import blend_rows, source_windows

    windows = source_windows(job)  # training windows: each source's held-out split excluded
    d = job.data
    notes = ([f"each source holds out {d.val_fraction:g} for validation"] if d.val_every else []) \
        + (["document-masked attention"] if d.document_mask else []) \
        + (["objective sft (loss-masked tokens)"] if d.objective == "sft" else [])
    table = Table(title=f"job {job.name}: data blend over {job.steps} steps x {job.global_batch} "
                  f"x {job.seq_len} tokens" + "".join(f"; {n}" for n in notes), title_justify="left")
    for col in ("phase", "source", "weight", "samples", "tokens", "epochs", "cap"):
        table.add_column(col, justify="left" if col in ("phase", "source") else "right")
    caps = {s.name: s.epochs for s in job.data.sources}
    rows = blend_rows(job, windows)
    totals = {name: sum(r.samples for r in rows if r.source == name) for name in caps}

    def add(phase, source, weight, samples):
        size = windows[source]
        epochs = "(not prepared)" if size is None else f"{samples / size:.3f}" if size else "(empty)"
        cap = "-" if caps[source] is None else f"{caps[source]:g}"
        table.add_row(phase, source, weight, f"{samples:,}", f"{samples * job.seq_len:,}", epochs, cap)

    for row in rows:
        if row.weight > 0:  # a source a phase does not draw from is left out of its rows
            add(row.phase, row.source, f"{row.weight:g}", row.samples)
    table.add_section()
    for name, samples in totals.items():
        add("whole job", name, "", samples)
    return table


@command("demo", help="the main job on the embedded default: specs/jobs/tiny-local.plait")
@arguments(lambda p: p.add_argument("--steps", type=int, default=50, help="training steps"))
def demo(args) -> int:
    inputs.at_least(args.steps, 1, "--steps")
    path = specs_dir() / DEMO_JOB
    job = load_file(str(path)).jobs["tiny-local"]
    console.print(report_table(model_report(job.model, job.seq_len, job.precision, job)))
    from plait.commands.run import run_demo  # plan on 8 local ranks, train on the bundled corpus
    return run_demo(job, args.steps)
