"""`data { ... }` in a train job: named sources, and a blend or phases of blends.

    data {
      seed = 1234                                  # optional, as in dataset(...)
      sources {
        web  = dataset(path = "data/web", epochs = 2)   # epochs: the most passes over it
        math = "data/math"
      }
      phase1 { web = 0.8, math = 0.2 }             # from the first token
      phase2 { at = 0.6, web = 0.5, math = 0.5 }   # from 60% of the job's tokens (or a count: 6e9)
      document_mask = true                         # optional: no attention across packed documents
      objective = sft                              # optional: loss on the loss-masked tokens only
      val_every = 100, val_fraction = 0.01         # optional: every source holds out 1% of its
    }                                              # windows; validation reports each one's loss

With one blend the weights may sit on the sources instead: `web = dataset(path = "...", weight = 0.8)`.
Every other sub-block of `data` is a phase, in the order written.
"""
from __future__ import annotations

import os
from typing import Optional

from plait.ir.datarecipe import (dataset_tokens, epoch_overruns, held_out, phase_starts,
                                 source_windows, windows_of)
from plait.ir.job import OBJECTIVES, Data, DataPhase, DataSource, TrainJob, document_mask_problem
from plait.ir.model import ModelSpec

from . import ast
from .reader import Context, Reader, describe, did_you_mean, to_float, to_int, to_string

WEIGHT_TOLERANCE = 1e-6


def data_path(path: str, base_dir: Optional[str]) -> str:
    """Data paths, like `use` paths, are relative to the spec file; the IR holds them absolute."""
    if base_dir is None or os.path.isabs(path):
        return path
    return os.path.abspath(os.path.join(base_dir, path))


def tokenizer_name(ctx: Context, value) -> str:
    if isinstance(value, ast.Ident):
        return value.name
    return to_string(ctx, value, "tokenizer")


def packing_options(ctx: Context, r: Reader, model: ModelSpec) -> dict:
    """document_mask = true | false and objective = pretrain | sft (of a dataset(...) call or a
    data block); a model that cannot honour the document mask is an error at the key."""
    document_mask = r.bool("document_mask", False)
    problem = document_mask_problem(model) if document_mask else None
    if problem:
        raise ctx.error(problem, r.entries["document_mask"].value.pos,
                        hint="remove document_mask (documents stay packed with EOS between them)")
    return {"document_mask": document_mask, "objective": r.choice("objective", OBJECTIVES,
                                                                  Data.objective)}


def validation_options(ctx: Context, r: Reader, pos: ast.Pos) -> dict:
    """val_every / val_fraction / val_batches (a held-out split: of the dataset, or of every
    source of a blend)."""
    every = r.int("val_every", 0, minimum=0)
    fraction = r.float("val_fraction", 0.05 if every else 0.0, minimum=0.0)
    if every and not 0 < fraction < 1:
        raise ctx.error(f"val_fraction must be between 0 and 1 (exclusive), got {fraction:g}",
                        pos, hint="e.g. val_fraction = 0.05")
    if fraction and not every:
        raise ctx.error("val_fraction needs val_every (how often to validate)", pos,
                        hint="e.g. val_every = 50")
    batches = r.int("val_batches", Data.val_batches, minimum=1)
    return {"val_every": every, "val_fraction": fraction if every else 0.0, "val_batches": batches}


def resolve_data_block(ctx: Context, block: ast.Block, pos: ast.Pos, base_dir: Optional[str],
                       model: ModelSpec) -> Data:
    r = Reader(ctx, block.entries, "data block", pos)
    sources_block = r.block("sources")
    if sources_block is None:
        raise ctx.error("the data block declares no sources", pos,
                        hint='add sources { web = dataset(path = "DIR", weight = 1) }')
    sources, source_weights = _sources(ctx, sources_block, base_dir)
    phase_entries = [e for e in block.entries if isinstance(e, ast.SubBlock) and e.key != "sources"]
    names = [s.name for s in sources]
    phases = tuple(_phase(ctx, e, names, first=i == 0) for i, e in enumerate(phase_entries))
    if phases and source_weights:
        raise ctx.error("weights are given both on sources and in phases", phase_entries[0].pos,
                        hint="keep one: weights on the sources (one blend) or phase blocks")
    if not phases:
        phases = (_single_blend(ctx, sources_block, source_weights, names),)
    tokenizer = r.value("tokenizer", None)
    data = Data(sources=sources, phases=phases, seed=r.int("seed", Data.seed, minimum=0),
                tokenizer=Data.tokenizer if tokenizer is None else tokenizer_name(ctx, tokenizer),
                **packing_options(ctx, r, model), **validation_options(ctx, r, pos))
    for e in phase_entries:
        r.has(e.key)  # phases are known keys
    r.finish()
    return data


def _sources(ctx: Context, r: Reader, base_dir) -> tuple[tuple[DataSource, ...], dict[str, float]]:
    sources, weights = [], {}
    for name, entry in r.entries.items():
        r.has(name)
        if isinstance(entry, ast.SubBlock) or not isinstance(entry.value, (ast.String, ast.Call)) or \
                (isinstance(entry.value, ast.Call) and entry.value.name != "dataset"):
            raise ctx.error(f'source {name} must be "path" or dataset(path = ..., weight = ..., '
                            f"epochs = ...)", entry.pos)
        value = entry.value
        if isinstance(value, ast.String):
            sources.append(DataSource(name, data_path(value.value, base_dir)))
            continue
        c = Reader.of_call(ctx, value)
        weight = c.value("weight", None)
        if weight is not None:
            weights[name] = to_float(ctx, weight, "weight", minimum=0.0)
        epochs = c.value("epochs", None)
        sources.append(DataSource(name, data_path(c.string("path"), base_dir),
                                  None if epochs is None else to_float(ctx, epochs, "epochs",
                                                                       positive=True)))
        c.finish()
    if not sources:
        raise ctx.error("the sources block is empty", r.pos)
    return tuple(sources), weights


def _single_blend(ctx: Context, r: Reader, weights: dict[str, float], names: list[str]) -> DataPhase:
    if len(names) == 1 and not weights:
        weights = {names[0]: 1.0}
    missing = [n for n in names if n not in weights]
    if missing:
        raise ctx.error(f"source {missing[0]} has no weight", r.entries[missing[0]].pos,
                        hint="add weight = ... to every source, or write phase blocks")
    _check_sum(ctx, weights, r.pos, "the source weights")
    return DataPhase("blend", tuple((n, weights[n]) for n in names))


def _phase(ctx: Context, entry: ast.SubBlock, names: list[str], first: bool) -> DataPhase:
    r = Reader(ctx, entry.block.entries, f"phase {entry.key}", entry.pos)
    at, at_tokens = _at(ctx, r, entry, first)
    weights = {}
    for key, e in r.entries.items():
        if key == "at":
            continue
        if key not in names:
            raise ctx.error(f"phase {entry.key} weighs {key!r}, which is not a declared source",
                            e.pos, hint=did_you_mean(key, names) or f"sources: {', '.join(names)}")
        r.has(key)
        weights[key] = to_float(ctx, r.value(key), f"the weight of {key}", minimum=0.0)
    _check_sum(ctx, weights, entry.pos, f"the weights of phase {entry.key}")
    r.finish()
    return DataPhase(entry.key, tuple((n, weights[n]) for n in names if n in weights), at, at_tokens)


def _at(ctx: Context, r: Reader, entry: ast.SubBlock, first: bool) -> tuple[float, Optional[int]]:
    value = r.value("at", None)
    if value is None:
        if not first:
            raise ctx.error(f"phase {entry.key} needs at = (a fraction of the job's tokens, or a "
                            "token count)", entry.pos, hint="e.g. at = 0.6")
        return 0.0, None
    if first:
        raise ctx.error(f"the first phase ({entry.key}) starts at the first token; remove at",
                        value.pos)
    if not isinstance(value, ast.Quantity):
        raise ctx.error(f"at must be a fraction or a token count, got {describe(value)}", value.pos)
    if value.unit is None and 0 < value.number < 1:
        return float(value.number), None
    return 0.0, to_int(ctx, value, "at (a token count)")


def _check_sum(ctx: Context, weights: dict[str, float], pos: ast.Pos, what: str) -> None:
    total = sum(weights.values())
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        terms = " + ".join(f"{w:g}" for w in weights.values())
        raise ctx.error(f"{what} sum to {terms} = {total:g}, not 1", pos,
                        hint="weights are fractions of the samples; make them add up to 1")


def check_blend(ctx: Context, job: TrainJob, block: ast.Block) -> None:
    """Phase starts in order and inside the job; epoch caps the token budget keeps (for sources
    that exist already: a spec may name data that is prepared later)."""
    total = job.steps * job.global_batch
    starts = phase_starts(job.data, total, job.seq_len)
    entries = {e.key: e for e in block.entries}
    for prev, cur, phase in zip(starts, starts[1:], job.data.phases[1:]):
        if not prev < cur < total:
            raise ctx.error(f"phase {phase.name} starts at sample {cur:,}, which is not after the "
                            f"previous phase's start ({prev:,}) and before the job's end "
                            f"({total:,} samples = {job.steps} steps x {job.global_batch})",
                            entries[phase.name].pos)
    sources = Reader(ctx, _sources_block(block).entries, "sources", block.pos).entries
    for name, message in epoch_overruns(job, source_windows(job)):
        raise ctx.error(message, sources[name].pos,
                        hint="raise epochs, lower the source's weight, or train fewer tokens")
    for name, message in small_validation_splits(job):
        raise ctx.error(message, sources[name].pos, hint="raise val_fraction or add data")


def small_validation_splits(job: TrainJob) -> list[tuple[str, str]]:
    """(source, sentence) per existing source whose held-out split holds less than one batch."""
    data, out = job.data, []
    if not data.val_every:
        return out
    for source in data.sources:
        tokens = dataset_tokens(source.path)
        if tokens is None:
            continue
        windows = windows_of(tokens, job.seq_len)
        held = held_out(windows, data.val_fraction)
        if held < job.global_batch:
            out.append((source.name, f"source {source.name!r} holds out {held} of its {windows:,} "
                        f"windows (val_fraction {data.val_fraction:g}) for validation, fewer than "
                        f"one global batch of {job.global_batch}"))
    return out


def _sources_block(block: ast.Block) -> ast.Block:
    return next(e.block for e in block.entries if isinstance(e, ast.SubBlock) and e.key == "sources")
