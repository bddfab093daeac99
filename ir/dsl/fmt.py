"""IR -> canonical spec text. parse_text(format_...(x)) rebuilds an equal IR.

The canonical form states required fields, the norm, rope and activations, and every other field
only where it differs from the IR default. Quantities get the unit that writes them shortest
(`80 GiB`, `3.35 TB/s`), checked to parse back to the identical float.
"""
from __future__ import annotations

import dataclasses
import os
import re
from decimal import Decimal
from typing import Optional

from plait.ir import kinds
from plait.ir.cluster import Cluster, Device, local_cpu
from plait.ir.errors import PlaitError
from plait.ir.job import Calibration, Data, Distill, Optimizer, Precision, PruneJob, TrainJob
from plait.ir.model import ModelSpec

from .comments import USE, Notes, attach
from .hardware import resize_cluster
from .literals import call, changed, decimal_text, layers_text, number, quantity, value_text

INDENT = "  "
ONE_LINE = 100  # a block whose entries fit on one line this long is written on one line


def format_model(spec: ModelSpec, notes: Optional[dict] = None) -> str:
    entries = [("vocab", number(spec.vocab)), ("hidden", number(spec.hidden)), ("norm", _norm(spec))]
    entries += changed(spec, ("tie_embeddings",))
    if spec.max_seq is not None:
        entries.append(("max_seq", number(spec.max_seq, tokens=True)))
    entries += changed(spec, ("learned_positions",))
    for kind in kinds.names():  # each kind's block in registry order, written by its dsl facet
        block = getattr(spec, kind)
        if block is not None:
            entries.append((kind, kinds.facet(kind, "dsl").format_block(block, spec)))
    if spec.is_hybrid:
        entries.append(("pattern", f'"{spec.pattern}"'))
    else:
        entries.append(("layers", layers_text(spec.layers)))
    return _decl("model", spec.name, entries, notes)


def format_device(device: Device, notes: Optional[dict] = None) -> str:
    entries = [("bf16", quantity(device.bf16_flops, "compute"))]
    entries += [(k, quantity(v, "compute")) for k, v in (("fp8", device.fp8_flops), ("fp32", device.fp32_flops))
                if v is not None]
    entries += [("memory", quantity(device.memory, "bytes")), ("hbm", quantity(device.hbm, "bandwidth"))]
    if device.calibration:
        entries.append(("calibration", [(k, number(v)) for k, v in device.calibration]))
    return _decl("device", device.name, entries, notes)


def format_cluster(cluster: Cluster, notes: Optional[dict] = None) -> str:
    default_latency = dataclasses.fields(type(cluster.intra))[1].default
    entries = [("nodes", number(cluster.nodes)), ("gpus_per_node", number(cluster.gpus_per_node)),
               ("device", f'"{cluster.device.name}"'),
               ("intra", quantity(cluster.intra.bandwidth, "bandwidth")),
               ("inter", quantity(cluster.inter.bandwidth, "bandwidth"))]
    for key, link in (("intra_latency", cluster.intra), ("inter_latency", cluster.inter)):
        if link.latency != default_latency:
            entries.append((key, quantity(link.latency, "time")))
    if cluster.backend != "nccl":
        entries.append(("backend", cluster.backend))
    return _decl("cluster", cluster.name, entries, notes)


def format_job(job: TrainJob, base_cluster: Optional[Cluster] = None, notes: Optional[dict] = None) -> str:
    """A train declaration; ``base_cluster`` is the declared cluster the job resizes with `gpus`."""
    entries = [("model", f'"{job.model.name}"'), ("cluster", f'"{job.cluster.name}"')]
    if base_cluster is not None and base_cluster.world != job.cluster.world:
        entries.append(("gpus", number(job.cluster.world)))
    entries += [("global_batch", number(job.global_batch)), ("seq_len", number(job.seq_len, tokens=True)),
                ("precision", _precision(job.precision))]
    if job.optimizer != Optimizer():
        entries.append(("optimizer", call(job.optimizer.kind, changed(job.optimizer, _OPTIMIZER_KEYS))))
    entries += _kind_options(job)
    if job.layout.pins:
        entries.append(("layout", [(k, value_text(v)) for k, v in job.layout.pins]))
    entries += changed(job, ("steps",))
    if job.data != Data():
        entries.append(("data", _data(job.data)))
    entries += changed(job, ("seed",))
    if job.timeout != TrainJob.timeout:
        entries.append(("timeout", quantity(job.timeout, "time")))
    return _decl("train", job.name, entries, notes)


def _kind_options(job: TrainJob) -> list:
    """The train-job options of the kinds that take some (the MoE dispatcher), where not defaults."""
    entries = []
    for kind in kinds.names():
        facet = kinds.facet(kind, "dsl")
        if facet.JOB_OPTIONS is not None and getattr(job, kind) != facet.JOB_OPTIONS():
            entries.append((kind, facet.format_job_options(getattr(job, kind))))
    return entries


def format_prune(job: PruneJob, notes: Optional[dict] = None) -> str:
    """A prune declaration; its model (and train setup) are referenced by name."""
    entries = [("model", f'"{job.model.name}"')]
    entries += [(k, f'"{v}"') for k, v in (("weights", job.weights), ("train", job.train and job.train.name))
                if v is not None]
    if not job.target.empty:
        entries.append(("target", _prune_target(job)))
    if job.axes or job.depth:
        entries.append(("axes", _prune_axes(job)))
    if job.layout.pins:
        entries.append(("layout", [(k, value_text(v)) for k, v in job.layout.pins]))
    if job.calibration != Calibration():
        cal = job.calibration
        entries.append(("calibration", ([("data", f'"{cal.data}"')] if cal.data else [])
                        + changed(cal, ("samples", "seq_len", "batch", "seed", "method", "depth"))))
    if job.distill != Distill():
        entries.append(("distill", _distill(job.distill)))
    if job.output is not None:
        entries.append(("output", f'"{job.output}"'))
    return _decl("prune", job.name, entries, notes)


def _prune_target(job: PruneJob) -> list:
    t = job.target
    entries = [(k, _count(getattr(t, k))) for k in ("params", "active_params") if getattr(t, k) is not None]
    if t.weight_memory is not None:
        entries.append(("weight_memory", quantity(t.weight_memory, "bytes")))
    entries += changed(t, ("precision",))
    if t.throughput is not None:
        entries.append(("throughput", number(t.throughput)))
    return entries


def _prune_axes(job: PruneJob) -> list:
    entries = []
    for a in job.axes:
        if a.mode == "fixed":
            entries.append((a.name, number(a.value)))
        elif (a.low, a.high, a.step) == (None, None, None):
            entries.append((a.name, "auto"))
        else:
            args = [(k, number(v)) for k, v in (("min", a.low), ("max", a.high), ("step", a.step)) if v is not None]
            entries.append((a.name, call("range", args)))
    if job.depth:
        entries.append(("depth", "[" + ", ".join(job.depth) + "]"))
    return entries


def _distill(d: Distill) -> list:
    entries = changed(d, ("steps", "global_batch", "seq_len", "temperature", "lm_loss"))
    if d.optimizer != Distill().optimizer:
        entries.append(("optimizer", call(d.optimizer.kind, changed(d.optimizer, _OPTIMIZER_KEYS))))
    if d.data is not None:
        entries.append(("data", f'"{d.data}"'))
    return entries + changed(d, ("seed", "checkpoint_every"))


def _count(n: int) -> str:
    """A parameter count, as `4.5e9` when that reads back exactly and is shorter."""
    plain = str(n)
    sci = decimal_text(Decimal(n))
    return sci if len(sci) < len(plain) and Decimal(sci) == n else plain


def format_library(lib) -> str:
    """Every declaration of a Library (and any a job needs that the library lacks), self-contained:
    devices, clusters, models, then jobs."""
    devices, clusters, models = dict(lib.devices), dict(lib.clusters), dict(lib.models)
    jobs, prunes = dict(lib.jobs), dict(getattr(lib, "prune_jobs", {}))
    for prune in prunes.values():  # a prune job's model and train setup come along
        if models.setdefault(prune.model.name, prune.model) != prune.model:
            raise PlaitError(f'prune job "{prune.name}": its model differs from model "{prune.model.name}" '
                             "of the library")
        if prune.train is not None and jobs.setdefault(prune.train.name, prune.train) != prune.train:
            raise PlaitError(f'prune job "{prune.name}": its train job differs from "{prune.train.name}"')
    bases = {}
    for job in jobs.values():
        if models.setdefault(job.model.name, job.model) != job.model:
            raise PlaitError(f'job "{job.name}": its model differs from model "{job.model.name}" of the library')
        bases[job.name] = _base_cluster(job, clusters)
        if bases[job.name] is not None and bases[job.name].name not in clusters and job.cluster.name != "local-cpu":
            clusters[job.cluster.name] = job.cluster
    for cluster in clusters.values():
        devices.setdefault(cluster.device.name, cluster.device)
    parts = [format_device(d) for d in devices.values()]
    parts += [format_cluster(c) for c in clusters.values()]
    parts += [format_model(m) for m in models.values()]
    parts += [format_job(j, bases[j.name]) for j in jobs.values()]
    parts += [format_prune(j) for j in prunes.values()]
    return "\n\n".join(parts) + "\n"


def format_file(lib) -> str:
    """The canonical text of the file a Library was loaded from: its `use` line, then its own
    declarations in source order, with the file's comments (comments.py)."""
    notes = attach(lib.module) if getattr(lib, "module", None) is not None else {}
    parts = []
    if lib.uses:
        parts.append(_leading(notes, USE, "") + "use " + ", ".join(f'"{u}"' for u in lib.uses))
    formatters = {"device": (lib.devices, format_device), "cluster": (lib.clusters, format_cluster),
                  "model": (lib.models, format_model), "prune": (lib.prune_jobs, format_prune)}
    for kind, name in lib.own:
        if kind == "train":
            job = lib.jobs[name]
            parts.append(format_job(job, _base_cluster(job, lib.clusters), notes))
        else:
            table, fmt = formatters[kind]
            parts.append(fmt(table[name], notes))
    end = notes.get((), Notes()).closing
    if end:
        parts.append("\n".join(end))
    return _paths_as_written(lib, "\n\n".join(parts) + "\n")


def _paths_as_written(lib, text: str) -> str:
    """The IR holds data / weights / output paths absolute (resolved against the file's directory);
    the file's own text keeps them as its author wrote them, relative ones relative."""
    module, base = getattr(lib, "module", None), getattr(lib, "base_dir", None)
    if module is None or base is None:
        return text
    for written in sorted(set(re.findall(r'"([^"\n]*)"', module.text)), key=len, reverse=True):
        if written and not os.path.isabs(written):
            text = text.replace(f'"{os.path.abspath(os.path.join(base, written))}"', f'"{written}"')
    return text


def _base_cluster(job: TrainJob, clusters: dict) -> Optional[Cluster]:
    base = clusters.get(job.cluster.name) or (local_cpu() if job.cluster.name == "local-cpu" else None)
    if base is None:
        return job.cluster
    if resize_cluster(base, job.cluster.world) != job.cluster:
        raise PlaitError(f'job "{job.name}": its cluster differs from cluster "{base.name}" by more than '
                         "its size, which a spec cannot express")
    return base


# --- model and job options -----------------------------------------------------------------------

def _norm(spec: ModelSpec) -> str:
    return f"{spec.norm.kind}(eps = {number(spec.norm.eps)})"


_OPTIMIZER_KEYS = ("lr", "min_lr", "betas", "eps", "weight_decay", "warmup", "schedule", "grad_clip",
                   "skip_bad_steps")


def _precision(p: Precision) -> str:
    if p.kind != "fp8" or p == Precision(kind="fp8"):
        return p.kind
    args = [("recipe", p.fp8_recipe)] if p.fp8_recipe else []
    if p.fp8_skip_first == p.fp8_skip_last:
        if p.fp8_skip_first != Precision().fp8_skip_first:
            args.append(("bf16_ends", number(p.fp8_skip_first)))
    else:
        args += [("skip_first", number(p.fp8_skip_first)), ("skip_last", number(p.fp8_skip_last))]
    return call("fp8", args)


def _data(d: Data):
    if d.sources:
        return _data_block(d)
    if d == Data(synthetic=True):
        return "synthetic"
    if d == Data(path=d.path) and d.path is not None:
        return f'"{d.path}"'
    args = [("path", f'"{d.path}"')] if d.path is not None else []
    args += changed(d, ("tokenizer", "seed", "val_every", "val_fraction", "val_batches",
                        "document_mask", "objective"))
    return call("synthetic" if d.synthetic else "dataset", args)


def _data_block(d: Data) -> list:
    """`data { sources { ... } phase { ... } }`; one blend from the start: weights on the sources."""
    single = len(d.phases) == 1 and d.phases[0].name == "blend"
    weights = dict(d.phases[0].weights) if single else {}
    sources = []
    for s in d.sources:
        args = [("path", f'"{s.path}"')]
        args += [("weight", number(weights[s.name]))] if s.name in weights else []
        args += [("epochs", number(s.epochs))] if s.epochs is not None else []
        sources.append((s.name, call("dataset", args) if len(args) > 1 else f'"{s.path}"'))
    entries = changed(d, ("seed", "tokenizer", "document_mask", "objective", "val_every",
                          "val_fraction", "val_batches")) + [("sources", sources)]
    for i, p in enumerate([] if single else d.phases):
        at = [] if i == 0 else [("at", number(p.at_tokens if p.at_tokens is not None else p.at))]
        entries.append((p.name, at + [(n, number(w)) for n, w in p.weights]))
    return entries


# --- text helpers -----------------------------------------------------------------------------

def _decl(keyword: str, name: str, entries: list, notes: Optional[dict] = None) -> str:
    if '"' in name or "\n" in name:  # a spec string holds neither
        raise PlaitError(f"the {keyword} name {name!r} cannot be written in a spec (quotes, line breaks)",
                         hint="choose a name without quotes or line breaks")
    notes = notes or {}
    path = (keyword, name)
    return (_leading(notes, path, "") + f'{keyword} "{name}" ' + _block(entries, 0, path, notes)
            + _trailing(notes, path))


def _block(entries: list, depth: int, path: tuple = (), notes: Optional[dict] = None) -> str:
    """`{ a = 1, b = 2 }` when it fits on a line and holds no sub-block or comment, else one entry
    per line, each with its comments (comments.py says where they belong)."""
    notes = notes or {}
    pad = INDENT * (depth + 1)
    lines = []
    for k, v in entries:
        sub = path + (k,)
        text = f"{k} {_block(v, depth + 1, sub, notes)}" if isinstance(v, list) else f"{k} = {v}"
        lines.append(_leading(notes, sub, pad) + pad + text + _trailing(notes, sub))
    here = notes.get(path, Notes())
    closing = here.closing + _orphans(notes, path, {k for k, _ in entries})
    inner_notes = here.opening or closing or any(
        len(p) > len(path) and p[:len(path)] == path for p in notes)
    flat = "{ " + ", ".join(line.strip() for line in lines) + " }"
    nested = any(isinstance(v, list) for _, v in entries)
    if depth > 0 and not nested and not inner_notes and len(flat) + len(INDENT) * depth < ONE_LINE:
        return flat
    opening = ("  " + "  ".join(here.opening)) if here.opening else ""
    return ("{" + opening + "\n" + "".join(f"{line}\n" for line in lines)
            + "".join(f"{pad}{c}\n" for c in closing) + INDENT * depth + "}")


def _leading(notes: dict, path: tuple, pad: str) -> str:
    n = notes.get(path)
    return "".join(f"{pad}{c}\n" for c in n.leading) if n else ""


def _trailing(notes: dict, path: tuple) -> str:
    n = notes.get(path)
    return ("  " + "  ".join(n.trailing)) if n and n.trailing else ""


def _orphans(notes: dict, path: tuple, written: set) -> list[str]:
    """Comments of entries below ``path`` that the canonical form does not write (defaults)."""
    return [c for p, n in notes.items()
            if len(p) > len(path) and p[:len(path)] == path and p[len(path)] not in written
            for c in n.all()]
