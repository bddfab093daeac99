"""AST -> IR for a whole library: `use` imports (with cycle detection), declaration names, and the
per-kind resolvers (hardware.py, models.py, jobs.py). Every problem is a SpecError with a location.

Declarations from every file reached through `use` share one namespace; a file reached twice
(a diamond) is loaded once, a file that reaches itself is an error naming the cycle.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from plait.ir.cluster import Cluster, Device, local_cpu
from plait.ir.errors import SpecError
from plait.ir.job import PruneJob, TrainJob
from plait.ir.model import ModelSpec

from . import ast
from .files import locate_use, read_spec_file, read_used_file
from .hardware import resolve_cluster, resolve_device, unknown_name
from .jobs import resolve_job
from .models import resolve_model
from .parse import parse
from .prune import resolve_prune
from .reader import Context, did_you_mean

# declaration keyword -> Library attribute, in resolution order (a cluster needs its device, ...)
DECL_KINDS = {"device": "devices", "cluster": "clusters", "model": "models", "train": "jobs",
              "prune": "prune_jobs"}


@dataclass
class Library:
    """Everything declared in a file and the files it `use`s, resolved to IR."""

    models: dict[str, ModelSpec] = field(default_factory=dict)
    devices: dict[str, Device] = field(default_factory=dict)
    clusters: dict[str, Cluster] = field(default_factory=dict)
    jobs: dict[str, TrainJob] = field(default_factory=dict)
    prune_jobs: dict[str, PruneJob] = field(default_factory=dict)
    file: Optional[str] = None  # the file that was loaded
    uses: tuple[str, ...] = ()  # its `use` paths as written
    own: tuple[tuple[str, str], ...] = ()  # (keyword, name) declared in that file, in source order
    module: Optional[ast.Module] = field(default=None, repr=False, compare=False)  # its syntax tree (fmt)
    base_dir: Optional[str] = field(default=None, repr=False, compare=False)  # its paths are relative to

    def summary(self) -> str:
        """`3 models, 1 device, 1 cluster, 0 jobs`."""
        parts = []
        for attr in ("models", "devices", "clusters", "jobs"):
            n = len(getattr(self, attr))
            parts.append(f"{n} {attr if n != 1 else attr[:-1]}")
        if self.prune_jobs:  # only mentioned when there are some
            n = len(self.prune_jobs)
            parts.append(f"{n} prune job{'s' if n != 1 else ''}")
        return ", ".join(parts)


@dataclass(frozen=True)
class _Source:
    module: ast.Module
    ctx: Context
    base_dir: str


def load_file(path: str) -> Library:
    """Parse and resolve a spec file and everything it `use`s."""
    text = read_spec_file(path)
    return parse_text(text, file=path, base_dir=os.path.dirname(path) or ".")


def parse_text(text: str, file: str = "<string>", base_dir: Optional[str] = None) -> Library:
    """Parse and resolve spec text; `use` paths are relative to ``base_dir`` (default: cwd)."""
    module = parse(text, file)
    root = _Source(module, Context(module), base_dir or ".")
    sources: list[_Source] = []
    _collect(root, stack=[], seen={}, out=sources)
    lib = _resolve(sources)
    lib.file = file
    lib.uses = tuple(p.value for use in root.module.uses for p in use.paths)
    lib.own = tuple((d.kind, d.name) for d in root.module.decls)
    lib.module, lib.base_dir = root.module, root.base_dir
    return lib


def _collect(src: _Source, stack: list[str], seen: dict, out: list[_Source]) -> None:
    """Depth-first over `use`, dependencies before dependents; ``stack`` holds the real paths in
    progress (a cycle), ``seen`` the ones finished (a diamond, loaded once)."""
    key = os.path.realpath(src.module.file) if src.module.file != "<string>" else "<string>"
    stack.append(key)
    for use in src.module.uses:
        for path in use.paths:
            full = locate_use(path.value, src.base_dir, _failing_at(src, path))
            real = os.path.realpath(full)
            if real in stack:
                cycle = stack[stack.index(real):] + [real]
                names = " -> ".join(os.path.relpath(p) for p in cycle)
                raise src.ctx.error(f"`use` cycle: {names}", path.pos,
                                    hint="move the shared declarations into a file both can use")
            if real in seen:
                continue
            child = _read(src, full, path)
            seen[real] = child
            _collect(child, stack, seen, out)
    stack.pop()
    out.append(src)


def _read(parent: _Source, full: str, path: ast.String) -> _Source:
    text = read_used_file(full, path.value, _failing_at(parent, path))
    module = parse(text, full)
    return _Source(module, Context(module), os.path.dirname(full) or ".")


def _failing_at(src: _Source, path: ast.String):
    """Errors about a `use` path, located at the path in the including file."""
    return lambda message, hint=None: src.ctx.error(message, path.pos, hint=hint)


def _resolve(sources: list[_Source]) -> Library:
    decls = _index(sources)
    lib = Library()
    for kind, attr in DECL_KINDS.items():  # devices before clusters, models before jobs
        table = getattr(lib, attr)
        for decl, src in decls[kind]:
            table[decl.name] = _resolve_decl(kind, decl, src, lib)
    return lib


def _resolve_decl(kind: str, decl: ast.Decl, src: _Source, lib: Library):
    ctx = src.ctx

    def finder(what: str, table: dict, fallback=None):
        def find(name: str, pos: ast.Pos):
            if name in table:
                return table[name]
            if fallback is not None and name == fallback.name:
                return fallback  # the embedded local-cpu cluster needs no declaration
            raise unknown_name(ctx, what, name, pos, list(table))
        return find

    if kind == "device":
        return resolve_device(ctx, decl)
    if kind == "cluster":
        return resolve_cluster(ctx, decl, finder("device", lib.devices))
    if kind == "model":
        return resolve_model(ctx, decl)
    if kind == "prune":
        return resolve_prune(ctx, decl, finder("model", lib.models), finder("train job", lib.jobs), src.base_dir)
    return resolve_job(ctx, decl, finder("model", lib.models), finder("cluster", lib.clusters, local_cpu()),
                       src.base_dir)


def _index(sources: list[_Source]) -> dict[str, list[tuple[ast.Decl, _Source]]]:
    """Declarations grouped by keyword; unknown keywords and duplicate names are errors."""
    decls: dict[str, list] = {kind: [] for kind in DECL_KINDS}
    first: dict[tuple[str, str], tuple[ast.Decl, _Source]] = {}
    for src in sources:
        for decl in src.module.decls:
            if decl.kind not in DECL_KINDS:
                raise src.ctx.error(f"unknown declaration '{decl.kind}'", decl.pos,
                                    hint=did_you_mean(decl.kind, DECL_KINDS) or
                                    f"declarations: {', '.join(DECL_KINDS)}")
            previous = first.get((decl.kind, decl.name))
            if previous is not None:
                where = f"{previous[1].module.file}:{previous[0].pos.line}"
                raise src.ctx.error(f'duplicate {decl.kind} "{decl.name}"', decl.name_pos,
                                    hint=f"first declared at {where}")
            first[(decl.kind, decl.name)] = (decl, src)
            decls[decl.kind].append((decl, src))
    return decls


def load_job(path: str, name: Optional[str] = None) -> TrainJob:
    """The named train job, or the only one declared in ``path``."""
    lib = load_file(path)
    return lib.jobs[_pick(lib, "train", lib.jobs, name)]


def load_prune_job(path: str, name: Optional[str] = None) -> PruneJob:
    """The named prune job, or the only one declared in ``path``."""
    lib = load_file(path)
    return lib.prune_jobs[_pick(lib, "prune", lib.prune_jobs, name)]


def load_model(path: str, name: Optional[str] = None) -> ModelSpec:
    """The named model, or the only model declared in ``path``; a job file gives its job's model."""
    lib = load_file(path)
    if name is not None and name not in lib.models and name in lib.jobs:
        return lib.jobs[name].model
    own_models = [n for k, n in lib.own if k == "model"]
    own_jobs = [n for k, n in lib.own if k == "train"]
    if name is None and not own_models and len(own_jobs) == 1:
        return lib.jobs[own_jobs[0]].model
    own_prunes = [n for k, n in lib.own if k == "prune"]
    if name is None and not own_models and not own_jobs and len(own_prunes) == 1:
        return lib.prune_jobs[own_prunes[0]].model
    return lib.models[_pick(lib, "model", lib.models, name)]


def _pick(lib: Library, kind: str, table: dict, name: Optional[str]) -> str:
    label = {"train": "train job", "prune": "prune job"}.get(kind, kind)
    if name is not None:
        if name not in table:
            raise SpecError(f'no {label} named "{name}"', file=lib.file,
                            hint=did_you_mean(name, table) or f"{label}s: {', '.join(table) or 'none'}")
        return name
    own = [n for k, n in lib.own if k == kind] or list(table)
    if len(own) != 1:
        what = f"{len(own)} {kind} declarations ({', '.join(own)})" if own else f"no {kind} declaration"
        raise SpecError(f"the file has {what}", file=lib.file,
                        hint=f"name the {label} you mean with --name" if own else None)
    return own[0]
