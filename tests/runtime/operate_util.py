"""Helpers for the operations tests: a tiny 2-rank job file, `plait run` as a user starts it (its own
process), and what /proc says about the processes a run left."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def job_file(tmp_path: Path, data: str = "synthetic", extra: str = "") -> Path:
    spec = tmp_path / "ops.plait"
    spec.write_text(f'''use "models/tiny-dense.plait"
train "ops" {{
  model = "tiny-dense"
  gpus = 2
  global_batch = 4
  seq_len = 32
  precision = fp32
  optimizer = adamw(lr = 1e-3, warmup = 2)
  data = {data}
  steps = 10
  {extra}
}}
''')
    return spec


def env() -> dict:
    return dict(os.environ, PLAIT_PATH=str(ROOT / "specs"), OMP_NUM_THREADS="1",
                PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")


def start_run(spec: Path, *argv: str) -> subprocess.Popen:
    """`plait run` in a session of its own: signals from the test reach it and nothing else."""
    return subprocess.Popen([sys.executable, "-m", "plait", "run", str(spec), "--layout", "dp=2",
                             *argv], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for(predicate, timeout_s: float = 240, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def train_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in lines if r["kind"] == "train"]


def by_step(run_dir: Path) -> dict[int, tuple[float, float]]:
    """Step -> (loss, grad norm), the last record of each step (a restart re-runs steps)."""
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in train_records(run_dir)}


def processes_mentioning(text: str) -> list[int]:
    """Live processes (not zombies) whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def rank_pid(run_dir: Path, rank: int) -> int | None:
    for pid in processes_mentioning(f"plait.runtime.worker {run_dir}"):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


def kill_rank(run_dir: Path, rank: int) -> int:
    pid = wait_for(lambda: rank_pid(run_dir, rank), 60, f"rank {rank}'s process")
    os.kill(pid, signal.SIGKILL)
    return pid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
