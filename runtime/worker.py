"""`python -m plait.runtime.worker RUN_DIR`: what torchrun starts on every rank.

Around the Trainer (runtime.train.run_worker) it keeps a run observable and stoppable:
  - the rank's output goes to RUN_DIR/rank-N.log and its state to RUN_DIR/status/ (failures.py);
  - after each step: checkpoint (--save), validation loss (the job's val_every), and the signal
    check that stops every rank together (signals.py);
  - rank 0 streams metrics.jsonl (metrics.py) and shows progress on the terminal;
  - after torchrun restarts the ranks (--max-restarts), they resume from the newest checkpoint
    under --save instead of starting over.
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Optional

from plait.ir.errors import PlaitError

from . import checkpoint, failures, signals, validation
from .metrics import MetricsWriter, memory_text


def resume_source(options: dict) -> Optional[str]:
    """The checkpoint to start from: after an elastic restart, the newest one this run saved;
    else --resume (None: from scratch)."""
    if failures.attempt() > 0 and options.get("save"):
        try:
            return str(checkpoint.find(options["save"]))
        except PlaitError:  # died before its first checkpoint: start where the run started
            pass
    return options.get("resume")


def _progress(steps: int, start: int, console):
    """A rich progress bar (plain lines when the console is not a terminal)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out = Console(file=console) if console is not None else Console()
    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), console=out,
                        transient=False)
    task = progress.add_task("train", total=steps, completed=start, stats="")

    def show(log, record: dict) -> None:
        stats = (f"loss {log.loss:.4f}  |g| {log.grad_norm:.3f}  lr {log.lr:.2e}  "
                 f"{log.tokens_per_s:,.0f} tok/s  MFU {record['mfu']:.1%}  {memory_text(record)}")
        progress.update(task, advance=1, stats=stats)
        if not out.is_terminal or log.step % 10 == 0 or log.step == steps - 1:
            out.print(f"step {log.step:4d}  {stats}", highlight=False, soft_wrap=True)  # one line per step in logs
    return progress, out, show


class StepHooks:
    """Trainer.fit's on_step (rank 0: metrics, progress) and after_step (every rank: save,
    validate, stop on a signal) for one run; a context manager around the fit."""

    def __init__(self, trainer, run_dir: Path, options: dict, saver, steps: int, start: int,
                 console=None):
        self.trainer, self.saver = trainer, saver
        job, plan, mesh = trainer.job, trainer.plan, trainer.mesh
        self.lead = mesh.rank == 0
        self.val_every = job.data.val_every
        self.val_loaders = validation.validation_loaders(trainer)
        self.stop = signals.GracefulStop(saver)
        self.metrics = self.progress = None
        if self.lead:
            self.metrics = MetricsWriter(run_dir, job, plan.seq_len, plan.global_batch, mesh.device)
            self.progress, self.out, self.show = _progress(steps, start, console)

    def __enter__(self) -> "StepHooks":
        self.stop.install()
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.uninstall()
        if self.progress is not None:
            self.progress.__exit__(*exc)
        if self.metrics is not None:
            self.metrics.close()

    def on_step(self, log) -> None:
        if self.lead:
            self.show(log, self.metrics.step(log))

    def after_step(self, trainer, completed: int, total: int) -> None:
        if self.saver is not None:
            self.saver(trainer, completed, total)
        if self.val_loaders and (completed % self.val_every == 0 or completed == total):
            loss, tokens, per = validation.validation_losses(trainer, self.val_loaders,
                                                             trainer.job.data.val_batches)
            blend = bool(trainer.job.data.sources)
            if self.lead:
                self.metrics.validation(completed, loss, tokens, per if blend else None)
                each = "".join(f", {n} {v:.4f}" for n, v in per.items()) if blend else ""
                self.out.print(f"validation after step {completed}: loss {loss:.4f}{each} "
                               f"({tokens:,} held-out tokens)", highlight=False)
        self.stop(trainer, completed, total)


def main(run_dir: str) -> int:
    """One rank, start to end: output to its log, its state recorded, errors summarised."""
    from .train import STOPPED, run_worker

    run_dir_path, rank = Path(run_dir), int(os.environ.get("RANK", "0"))
    console = failures.capture_output(run_dir_path, rank)
    failures.mark(run_dir_path, rank, "started")
    try:
        status = run_worker(run_dir_path, console=console)
    except signals.Stopped as stop:
        failures.mark(run_dir_path, rank, "stopped", saved=str(stop.saved) if stop.saved else None)
        if rank == 0:
            print(f"rank 0: {stop}", file=console, flush=True)
        return 0
    except BaseException as err:  # noqa: BLE001 - every failure is recorded, then reported
        traceback.print_exc()
        sys.stderr.flush()
        failures.mark(run_dir_path, rank, "failed", err)
        return 1
    if status:  # stopped on its own (a non-finite step): the reason is in STOPPED
        failures.mark(run_dir_path, rank, "failed", RuntimeError(
            f"the ranks stopped early with status {status} (see {run_dir_path / STOPPED})"))
        return status
    failures.mark(run_dir_path, rank, "finished")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
