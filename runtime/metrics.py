"""Per-step metrics of a run, streamed by rank 0 to RUN_DIR/metrics.jsonl (one JSON object per line,
flushed each step, so `tail -f` and `plait plot` see a live run) and to TensorBoard under
RUN_DIR/tensorboard when the `tensorboard` package is installed.

Each step: loss, gradient norm, learning rate, step time, tokens/s, MFU and memory. MFU uses the
cost model's model FLOPs (ir/counts, no recompute) over the cluster's bf16 peak, the definition
`plait plan` predicts with, so the two compare directly. Memory says what it measured: the CUDA
caching allocator's peak on GPUs, the process's peak resident set on CPUs.
"""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Optional

import torch

from plait.ir import counts
from plait.ir.job import TrainJob

METRICS = "metrics.jsonl"


def memory(device: torch.device) -> dict:
    """This rank's peak memory, labelled with what it is."""
    if device.type == "cuda":
        return {"memory_kind": "cuda_max_allocated", "memory_bytes": torch.cuda.max_memory_allocated(device)}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"memory_kind": "cpu_peak_rss", "memory_bytes": rss}


def memory_text(record: dict) -> str:
    label = "CUDA max alloc" if record["memory_kind"] == "cuda_max_allocated" else "RSS"
    return f"{label} {record['memory_bytes'] / 2**20:,.0f} MiB"


def step_flops(job: TrainJob, seq_len: int, global_batch: int) -> float:
    """Model FLOPs of one optimizer step (forward + backward), as the planner counts them."""
    return global_batch * seq_len * counts.flops_per_token(job.model, seq_len)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(run_dir / "tensorboard"))
    except Exception:  # noqa: BLE001 - tensorboard not installed (or broken): JSONL only
        return None


class MetricsWriter:
    """Rank 0's sink for step and validation records."""

    def __init__(self, run_dir: Path, job: TrainJob, seq_len: int, global_batch: int,
                 device: torch.device):
        self.path = Path(run_dir) / METRICS
        self.file = open(self.path, "a", buffering=1)
        self.device = device
        self.flops = step_flops(job, seq_len, global_batch)
        self.peak = job.cluster.world * job.cluster.device.peak_flops("bf16")
        self.board = _tensorboard(Path(run_dir))

    def _write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        if self.board is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time"):
                    self.board.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def step(self, log) -> dict:
        """``log``: the Trainer's StepLog (0-based step; recorded as completed steps)."""
        record = {"kind": "train", "step": log.step + 1, "time": time.time(), "loss": log.loss,
                  "grad_norm": log.grad_norm, "lr": log.lr, "step_time_s": log.step_time,
                  "tokens_per_s": log.tokens_per_s,
                  "mfu": self.flops / (log.step_time * self.peak), **memory(self.device)}
        self._write(record)
        return record

    def validation(self, step: int, loss: float, tokens: int,
                   sources: Optional[dict[str, float]] = None) -> dict:
        """``sources``: a blend's loss on each source's own held-out split."""
        record = {"kind": "validation", "step": step, "time": time.time(), "loss": loss,
                  "tokens": tokens}
        if sources:
            record["sources"] = dict(sources)
        self._write(record)
        return record

    def close(self) -> None:
        self.file.close()
        if self.board is not None:
            self.board.close()


def read(run_dir: Path, kind: Optional[str] = None) -> list[dict]:
    """The records of a run (of one kind), in order; a half-written last line is skipped."""
    path = Path(run_dir) / METRICS
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if kind is None or record.get("kind") == kind:
            records.append(record)
    return records
