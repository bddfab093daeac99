"""Data pipeline: `plait data prepare` throughput, and the loader's cost per training step.

1. prepare: a JSONL corpus (documents cut from the bundled corpus, repeated to --mb MB) written as a
   Megatron indexed dataset with the byte tokenizer (or --tokenizer), with 1 and 2 worker
   processes: MB/s of input, and MB/s per process.
2. loader: the tiny job (tiny-local: global batch 16, seq 128) on one thread: the median time of
   one training step (forward, backward, AdamW update of the reference module on the global batch)
   against the median time the loader takes to deliver that batch, for one dataset and for a
   four-source two-phase blend; the ratio is the loader's share of a step (goal <= 1%).
3. packing: the same dataset delivered packed (per-document positions from the index, and an
   all-ones loss mask read for the whole global batch: the SFT path), and the training step of the
   document-masked model (block-diagonal attention mask) against the plain causal step.

    .venv/bin/python benchmarks/data_pipeline.py [--mb 20] [--steps 30]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "specs" / "jobs" / "tiny-local.plait"


def _corpus(path: Path, megabytes: float) -> int:
    from plait.runtime.data import bundled_corpus

    paragraphs = [p for p in bundled_corpus().read_text().split("\n\n") if p.strip()]
    written, i = 0, 0
    with open(path, "w") as f:
        while written < megabytes * 1e6:
            line = json.dumps({"text": paragraphs[i % len(paragraphs)], "id": i}) + "\n"
            f.write(line)
            written += len(line.encode())
            i += 1
    return written


def prepare_rate(megabytes: float, tokenizer: str) -> list[dict]:
    from plait.runtime.data import prepare

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "corpus.jsonl"
        size = _corpus(src, megabytes)
        for workers in (1, 2):
            start = time.perf_counter()
            meta = prepare([src], Path(tmp) / f"ds{workers}", tokenizer, workers=workers)
            seconds = time.perf_counter() - start
            rows.append({"workers": workers, "mb": size / 1e6, "s": seconds,
                         "mb_s": size / 1e6 / seconds, "tokens": meta["num_tokens"],
                         "documents": meta["documents"]})
    return rows


def _median_time(fn, reps: int) -> float:
    times = []
    for i in range(reps + 2):
        start = time.perf_counter()
        fn(i)
        if i >= 2:  # two warm-up calls
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _loaders(job, tmp: Path):
    from plait.ir.job import Data, DataPhase, DataSource
    from plait.runtime.data import BatchLoader, Packing, bundled_corpus, open_source, prepare
    from plait.runtime.data_blend import blended_loader

    prepare([bundled_corpus()], tmp / "one")
    single = BatchLoader(open_source(str(tmp / "one"), job.model.vocab), job.seq_len,
                         job.global_batch, seed=1)
    packed = BatchLoader(open_source(str(tmp / "one"), job.model.vocab), job.seq_len,
                         job.global_batch, seed=1,
                         packing=Packing(document_mask=True, loss_mask=True))
    names = ("web", "code", "math", "books")
    for name in names:
        prepare([bundled_corpus()], tmp / name)
    sources = tuple(DataSource(n, str(tmp / n)) for n in names)
    phases = (DataPhase("p1", (("web", 0.35), ("code", 0.40), ("math", 0.15), ("books", 0.10))),
              DataPhase("p2", (("web", 0.45), ("code", 0.25), ("math", 0.20), ("books", 0.10)), at=0.6))
    blend_job = replace(job, steps=1000, data=Data(sources=sources, phases=phases))
    return single, blended_loader(blend_job, job.seq_len, job.global_batch), packed


def loader_share(steps: int) -> dict:
    import torch  # here, not at the top: prepare's spawned workers re-import this module
    from plait.ir.dsl import load_job
    from plait.lowering.build import build_model

    torch.set_num_threads(1)
    job = load_job(str(JOB))
    with tempfile.TemporaryDirectory() as tmp:
        single, blend, packed = _loaders(job, Path(tmp))
        step = _median_time(_train_step(build_model(job.model, seed=0), single.local_batch(0)), steps)
        masked = build_model(job.model, seed=0, document_mask=True)
        docs_step = _median_time(_train_step(masked, packed.local_batch(0)), steps)
        one = _median_time(lambda i: single.local_batch(i), steps)
        # the blend is read at steps across its phase switch (step 600 of 1000)
        mixed = _median_time(lambda i: blend.local_batch(590 + i), steps)
        pack = _median_time(lambda i: packed.local_batch(i), steps)
        docs = float((packed.local_batch(0).positions == 0).sum()) / job.global_batch
    return {"step_s": step, "single_s": one, "blend_s": mixed, "packed_s": pack,
            "docs_step_s": docs_step, "docs": docs, "batch": job.global_batch, "seq": job.seq_len}


def _train_step(model, batch):
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    extra = () if batch.positions is None else (batch.positions,)

    def step(_):
        opt.zero_grad(set_to_none=True)
        model(batch.tokens, batch.labels, *extra).backward()
        opt.step()
    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=20.0, help="corpus size for prepare")
    parser.add_argument("--steps", type=int, default=30, help="timed repetitions")
    parser.add_argument("--tokenizer", default="byte")
    args = parser.parse_args(argv)
    prep = prepare_rate(args.mb, args.tokenizer)
    share = loader_share(args.steps)
    table = Table(title=f"data pipeline (CPU; prepare: {args.tokenizer} tokenizer, JSONL; loader: "
                  f"tiny-local, batch {share['batch']} x seq {share['seq']}, 1 thread)")
    for col in ("measurement", "time", "rate", "ratio"):
        table.add_column(col)
    base = prep[0]["mb_s"]
    for row in prep:
        table.add_row(f"prepare {row['mb']:.1f} MB, {row['documents']:,} documents, "
                      f"{row['workers']} worker(s)", f"{row['s']:.2f} s",
                      f"{row['mb_s']:.1f} MB/s ({row['mb_s'] / row['workers']:.1f} MB/s per process)",
                      f"{row['mb_s'] / base:.2f}x of 1 worker")
    table.add_row("training step (fwd + bwd + AdamW, median)", f"{share['step_s'] * 1e3:.2f} ms", "", "1")
    for label, key in (("loader: one dataset", "single_s"), ("loader: 4-source 2-phase blend", "blend_s"),
                       ("loader: packed (positions + loss mask)", "packed_s")):
        table.add_row(f"{label} (median)", f"{share[key] * 1e3:.3f} ms", "",
                      f"{share[key] / share['step_s']:.2%} of a step (goal <= 1%)")
    table.add_row(f"training step, document-masked ({share['docs']:.1f} documents per sequence)",
                  f"{share['docs_step_s'] * 1e3:.2f} ms", "",
                  f"{share['docs_step_s'] / share['step_s']:.2f}x of the causal step")
    Console(width=150).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
