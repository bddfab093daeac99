"""A job's data recipe resolved to samples: where each phase starts, how many samples and epochs
each source gives per phase, and the epoch caps. Shared by spec checks (`plait check`) and the
runtime's loader, so what check prints is what run draws. Numpy only (ir/blend.py, ir/indexed.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from plait.ir.blend import BlendSchedule, Phase, counts
from plait.ir.errors import PlaitError
from plait.ir.indexed import IndexedDataset, prefix_of
from plait.ir.job import Data, TrainJob

LEGACY_TOKENS = "tokens.bin"


def dataset_tokens(path: str) -> Optional[int]:
    """Tokens in a dataset (Megatron prefix, prepare directory, or the older flat format); None
    when nothing is there (yet): specs may name data that a later `plait data prepare` builds."""
    prefix = prefix_of(path)
    if prefix is not None:
        return IndexedDataset(prefix).num_tokens
    meta = Path(path) / "meta.json"
    if meta.is_file() and (Path(path) / LEGACY_TOKENS).is_file():
        return int(json.loads(meta.read_text())["num_tokens"])
    return None


def windows_of(tokens: int, seq_len: int) -> int:
    """Training samples a source of ``tokens`` holds: windows of seq_len + 1 tokens that overlap
    by one (the last input's label), as runtime/data.py reads them."""
    return max(0, (tokens - 1) // seq_len)


def held_out(windows: int, fraction: float) -> int:
    """Windows a dataset (each source of a blend) keeps for validation: its last ``fraction``
    (0 without validation)."""
    return int(windows * fraction) if fraction > 0 else 0


def training_windows(windows: int, data: Data) -> int:
    """The windows training may draw from: all but the held-out validation split."""
    return windows - held_out(windows, data.val_fraction if data.val_every else 0.0)


def phase_starts(data: Data, total_samples: int, seq_len: int) -> list[int]:
    """The first global sample of each phase."""
    starts = []
    for phase in data.phases:
        if phase.at_tokens is not None:
            starts.append(phase.at_tokens // seq_len)
        else:
            starts.append(round(phase.at * total_samples))
    return starts


def schedule(job: TrainJob) -> BlendSchedule:
    data = job.data
    names = [s.name for s in data.sources]
    starts = phase_starts(data, job.steps * job.global_batch, job.seq_len)
    phases = [Phase(start, tuple(dict(p.weights).get(n, 0.0) for n in names))
              for start, p in zip(starts, data.phases)]
    return BlendSchedule(phases, len(names))


@dataclass(frozen=True)
class BlendRow:
    phase: str
    source: str
    weight: float
    samples: int
    tokens: int
    epochs: Optional[float]  # samples / the source's windows; None when its size is unknown


def blend_rows(job: TrainJob, windows: dict[str, Optional[int]]) -> list[BlendRow]:
    """Samples, tokens and epochs of every source in every phase of the job."""
    total = job.steps * job.global_batch
    starts = phase_starts(job.data, total, job.seq_len) + [total]
    rows = []
    for i, phase in enumerate(job.data.phases):
        weights = [dict(phase.weights).get(s.name, 0.0) for s in job.data.sources]
        got = counts(weights, max(0, min(starts[i + 1], total) - starts[i]))
        for source, w, n in zip(job.data.sources, weights, got):
            size = windows.get(source.name)
            rows.append(BlendRow(phase.name, source.name, w, int(n), int(n) * job.seq_len,
                                 n / size if size else None))
    return rows


def epoch_overruns(job: TrainJob, windows: dict[str, Optional[int]]) -> list[tuple[str, str]]:
    """(source, sentence) per source whose epoch cap the job's token budget exceeds (the arithmetic)."""
    drawn = schedule(job).draws_until(job.steps * job.global_batch)
    out = []
    for source, n in zip(job.data.sources, drawn):
        size = windows.get(source.name)
        if source.epochs is None or not size:
            continue
        cap = int(source.epochs * size)
        if n > cap:
            out.append((source.name, f"source {source.name!r} would give {int(n):,} samples = {n / size:.2f} epochs "
                       f"of its {size:,} windows of {job.seq_len} tokens, over its cap of "
                       f"{source.epochs:g} epochs ({cap:,} samples)"))
    return out


def source_windows(job: TrainJob) -> dict[str, Optional[int]]:
    sizes = {}
    for source in job.data.sources:
        tokens = dataset_tokens(source.path)
        sizes[source.name] = None if tokens is None else \
            training_windows(windows_of(tokens, job.seq_len), job.data)
    return sizes


def check_sources_exist(job: TrainJob) -> None:
    """Before a launch: every source of a blend is there (spec checks allow data not built yet)."""
    for source in job.data.sources:
        if dataset_tokens(source.path) is None:
            raise PlaitError(f"data source {source.name!r}: no dataset at {source.path}",
                             hint="build it with `plait data prepare FILES -o DIR`")
