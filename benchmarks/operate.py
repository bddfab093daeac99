"""Operating a run on this machine: how fast `plait run` stops on SIGTERM / SIGINT (and what it
leaves), how soon a stalled rank is reported against the job's timeout, and what a killed rank
costs with --max-restarts against an uninterrupted run. One table; the tiny dense model on 2 CPU
ranks (gloo)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
JOB = """use "models/tiny-dense.plait"
train "ops" {
  model = "tiny-dense"
  gpus = 2
  global_batch = 4
  seq_len = 32
  precision = fp32
  data = synthetic
  steps = 10
}
"""


def _env() -> dict:
    return dict(os.environ, PLAIT_PATH=str(ROOT / "specs"), OMP_NUM_THREADS="1",
                PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")


def _start(work: Path, name: str, *argv: str) -> tuple[subprocess.Popen, Path]:
    spec = work / "ops.plait"
    spec.write_text(JOB)
    run_dir = work / name
    proc = subprocess.Popen([sys.executable, "-m", "plait", "run", str(spec), "--layout", "dp=2",
                             "--run-dir", str(run_dir), *argv], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    return proc, run_dir


def _steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def _wait(predicate, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(0.05)


def _left(run_dir: Path) -> int:
    """Live processes whose command line names the run directory."""
    count = 0
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError, ValueError):
            continue
        count += str(run_dir) in cmd and state != "Z"
    return count


def stop_on(work: Path, sig: int, save: bool) -> dict:
    extra = ["--save", str(work / f"ckpt-{sig}")] if save else []
    proc, run_dir = _start(work, f"stop-{sig}", "--steps", "1000", *extra)
    _wait(lambda: len(_steps(run_dir)) >= 2)
    sent = time.monotonic()
    os.kill(proc.pid, sig)
    proc.communicate(timeout=300)
    took = time.monotonic() - sent
    step_time = sorted(r["step_time_s"] for r in _steps(run_dir))[len(_steps(run_dir)) // 2]
    return {"seconds": took, "left": _left(run_dir), "step_s": step_time,
            "saved": any((work / f"ckpt-{sig}").glob("step-*")) if save else None}


def restart_cost(work: Path) -> dict:
    t0 = time.monotonic()
    ref, ref_dir = _start(work, "ref", "--steps", "10", "--save", str(work / "c0"), "--save-every", "2")
    ref.communicate(timeout=600)
    plain = time.monotonic() - t0
    t0 = time.monotonic()
    proc, run_dir = _start(work, "kill", "--steps", "10", "--save", str(work / "c1"),
                           "--save-every", "2", "--max-restarts", "1")
    _wait(lambda: (work / "c1" / "latest").is_file())
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"plait.runtime.worker {run_dir}" in cmd and b"RANK=1" in env:
            os.kill(int(entry.name), signal.SIGKILL)
            break
    proc.communicate(timeout=600)
    restarted = time.monotonic() - t0
    last = lambda d: {r["step"]: r["loss"] for r in _steps(d)}  # noqa: E731
    return {"plain": plain, "restarted": restarted, "same": last(run_dir) == last(ref_dir),
            "status": proc.returncode}


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="plait-operate-") as tmp:
        work = Path(tmp)
        term = stop_on(work, signal.SIGTERM, save=True)
        intr = stop_on(work, signal.SIGINT, save=False)
        restart = restart_cost(work)
    table = Table(title="operating a run (tiny-dense, 2 gloo ranks on this machine)")
    for col in ("event", "plait", "reference", "ratio"):
        table.add_column(col)
    table.add_row("SIGTERM with --save: signal to exit", f"{term['seconds']:.1f} s "
                  f"(checkpoint {'written' if term['saved'] else 'MISSING'}, "
                  f"{term['left']} processes left)", f"{term['step_s']:.2f} s per step",
                  f"{term['seconds'] / term['step_s']:.1f} steps")
    table.add_row("SIGINT: signal to exit", f"{intr['seconds']:.1f} s ({intr['left']} processes "
                  "left)", f"{intr['step_s']:.2f} s per step", f"{intr['seconds'] / intr['step_s']:.1f} steps")
    table.add_row("rank 1 SIGKILLed, --max-restarts 1", f"{restart['restarted']:.1f} s (exit "
                  f"{restart['status']}, losses {'identical' if restart['same'] else 'DIFFER'})",
                  f"{restart['plain']:.1f} s uninterrupted", f"{restart['restarted'] / restart['plain']:.2f}x")
    Console(width=160).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
