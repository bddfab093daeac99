"""Start-up cost of the CLI: CPU seconds (user + sys of the child process) of each command that only
reads specs or plans, next to the bare interpreter and to `import torch`, median of --reps runs.

Each command runs as a user runs it, in a fresh interpreter; the last column says whether it
imported torch (it should not: `plait check` of a library spec must stay within 0.3 CPU s).

    .venv/bin/python benchmarks/startup.py [--reps 5]
"""
from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
MOE_JOB = "specs/jobs/mixtral-8x22b-128gpu.plait"
PROBE = ("import sys; from plait.cli import main; rc = main(sys.argv[1:]); "
         "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr); sys.exit(rc)")

CASES = [
    ("python -c pass", ["-c", "pass"]),
    ("python -c 'import torch'", ["-c", "import torch"]),
    ("plait check tiny-local", ["-c", PROBE, "check", "specs/jobs/tiny-local.plait"]),
    ("plait show mixtral-8x22b", ["-c", PROBE, "show", "specs/models/mixtral-8x22b.plait"]),
    ("plait fmt llama-3.1-8b", ["-c", PROBE, "fmt", "specs/models/llama-3.1-8b.plait"]),
    ("plait groups tiny-local", ["-c", PROBE, "groups", "specs/jobs/tiny-local.plait", "--layout", "tp=2 pp=2"]),
    ("plait estimate mixtral 128 GPUs", ["-c", PROBE, "estimate", MOE_JOB, "--layout", "tp=2 pp=8 ep=8 etp=1"]),
    ("plait plan mixtral 128 GPUs", ["-c", PROBE, "plan", MOE_JOB]),
    ("plait export megatron mixtral", ["-c", PROBE, "export", "megatron", MOE_JOB]),
]


def cpu_seconds(args: list[str]) -> tuple[float, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = out.stderr.strip().splitlines()
    return cpu, (lines[-1] if lines and lines[-1] in ("TORCH", "NO-TORCH") else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    reps = parser.parse_args().reps
    results = []
    for name, args in CASES:
        runs = [cpu_seconds(args) for _ in range(reps)]
        results.append((name, statistics.median(c for c, _ in runs), runs[0][1]))
    torch_cpu = results[1][1]
    table = Table(title=f"CLI start-up, CPU s (median of {reps})")
    for col in ("command", "CPU s", "/ import torch", "imports torch"):
        table.add_column(col)
    for name, cpu, torch_flag in results:
        table.add_row(name, f"{cpu:.3f}", f"{cpu / torch_cpu:.2f}", {"TORCH": "yes", "NO-TORCH": "no"}.get(torch_flag, "-"))
    Console().print(table)


if __name__ == "__main__":
    main()
