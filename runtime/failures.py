"""Rank logs and the one-paragraph failure summary.

Each rank writes its whole output to RUN_DIR/rank-N.log (rank 0 also keeps the terminal for its
progress lines) and its state to RUN_DIR/status/rank-N.json: started, finished, stopped or failed
with the time and the first line of its error. `plait run` reads the states after torchrun ends
and prints which rank failed first, its error, and where the full log is, instead of every rank's
traceback. A rank that started and never recorded an end was killed (SIGKILL, out of memory): it
is the likely first failure, the others' "connection closed" errors follow from it.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional, TextIO

STATUS = "status"
ATTEMPT_VAR = "TORCHELASTIC_RESTART_COUNT"  # torchrun's restart number (0: the first attempt)


def rank_log(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / f"rank-{rank}.log"


def attempt() -> int:
    return int(os.environ.get(ATTEMPT_VAR, "0"))


def capture_output(run_dir: Path, rank: int) -> TextIO:
    """Send this process's stdout and stderr (Python's and native code's: fds 1 and 2) to its rank
    log; returns a stream to the original stdout for what the terminal should still show."""
    sys.stdout.flush()
    sys.stderr.flush()
    console = os.fdopen(os.dup(1), "w", buffering=1)
    log = open(rank_log(run_dir, rank), "a", buffering=1)
    log.write(f"==== rank {rank}, attempt {attempt()}, pid {os.getpid()}, "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')} ====\n")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    return console


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def mark(run_dir: Path, rank: int, state: str, error: Optional[BaseException] = None,
         **extra) -> None:
    """Record this rank's state (written whole, then renamed: a reader never sees half)."""
    folder = Path(run_dir) / STATUS
    folder.mkdir(exist_ok=True)
    record = {"rank": rank, "state": state, "time": time.time(), "attempt": attempt(),
              "error": first_line(error) if error is not None else None, **extra}
    tmp = folder / f".rank-{rank}.json.{os.getpid()}"
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, folder / f"rank-{rank}.json")


def read_states(run_dir: Path) -> list[dict]:
    folder = Path(run_dir) / STATUS
    states = []
    for path in sorted(folder.glob("rank-*.json")) if folder.is_dir() else []:
        try:
            states.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(states, key=lambda s: s["rank"])


ROOT_CAUSE = re.compile(r"Root Cause \(first observed failure\):.*?^\s*rank\s*:\s*(\d+)",
                        re.S | re.M)


def first_observed_first(vanished: list[int], run_dir: Path) -> list[int]:
    """Ranks that died without a word, torchrun's first observed failure first: a rank killed by
    a signal takes its peers down with it (torchrun stops them, or they die blocked on it), and
    only torchrun saw which went first (RUN_DIR/torchrun.log, its "Root Cause" block)."""
    try:
        text = (Path(run_dir) / "torchrun.log").read_text(errors="replace")
    except OSError:
        return vanished
    causes = [int(m) for m in ROOT_CAUSE.findall(text)]
    if causes and causes[-1] in vanished:
        return [causes[-1]] + [r for r in vanished if r != causes[-1]]
    return vanished


def summary(run_dir: Path, world: int) -> str:
    """Why a run failed, in a few lines: the first failing rank, its error, where its log is."""
    run_dir = Path(run_dir)
    states = read_states(run_dir)
    last = max((s["attempt"] for s in states), default=0)
    states = [s for s in states if s["attempt"] == last]
    known = {s["rank"] for s in states}
    vanished = first_observed_first([s["rank"] for s in states if s["state"] == "started"], run_dir)
    failed = sorted((s for s in states if s["state"] == "failed"), key=lambda s: s["time"])
    never = [r for r in range(world) if r not in known]
    lines = []
    if vanished:
        lines.append(f"rank {vanished[0]} died without an error (killed by a signal, or out of "
                     f"memory?){_others(vanished)}; its log: {rank_log(run_dir, vanished[0])}")
    if failed:
        first = failed[0]
        lead = "then " if vanished else ""
        lines.append(f"{lead}rank {first['rank']} failed first: {first['error']}")
        lines.append(f"  full log: {rank_log(run_dir, first['rank'])}")
        if len(failed) > 1:
            lines.append(f"  {_ranks([s['rank'] for s in failed[1:]])} failed after it")
    if never:
        lines.append(f"{_ranks(never)} never started (see {run_dir / 'torchrun.log'})")
    if not lines:
        lines.append(f"no rank reported an error; see {run_dir / 'torchrun.log'}")
    if last:
        lines.append(f"  (attempt {last + 1}: torchrun restarted the ranks {last} time(s))")
    return "\n".join(lines)


def _others(ranks: list[int]) -> str:
    return f" (also gone: ranks {', '.join(map(str, ranks[1:]))})" if len(ranks) > 1 else ""


def _ranks(ranks: list[int]) -> str:
    if len(ranks) > 4:
        return f"ranks {ranks[0]}..{ranks[-1]} ({len(ranks)} ranks)"
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))
