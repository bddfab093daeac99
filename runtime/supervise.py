"""`plait run` owns the processes it starts: torchrun in a session of its own, its ranks marked with
a token in their environment. SIGINT / SIGTERM to `plait run` are passed on to torchrun as SIGTERM
(torchrun passes it to every rank; ranks with --save checkpoint before stopping); a second signal, or
torchrun exiting, ends whatever still carries the token, so no rank outlives the command.

Why a token and not the process group: torchrun starts each rank in a new session, so ranks leave
torchrun's group; the environment is inherited by every descendant and readable in /proc.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

TOKEN_VAR = "PLAIT_RUN_TOKEN"
GRACE_S = 60.0  # after the first signal: time for ranks to checkpoint before they are killed


@dataclass(frozen=True)
class Outcome:
    status: int  # torchrun's exit status (negative: killed by that signal)
    signal: Optional[int] = None  # the signal `plait run` received, if any
    swept: int = 0  # processes still carrying the token after torchrun ended, killed


def new_token() -> str:
    return uuid.uuid4().hex


def processes_with_token(token: str) -> list[int]:
    """Pids of this user's processes whose environment holds ``TOKEN_VAR=token`` (/proc, Linux)."""
    needle = f"{TOKEN_VAR}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:  # gone, or another user's
            continue
        if needle in env.split(b"\0"):
            found.append(int(entry.name))
    return found


def sweep(token: str, sig: int = signal.SIGKILL) -> int:
    """Signal every process carrying ``token``; the number signalled."""
    pids = processes_with_token(token)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return len(pids)


class _Signals:
    """While running: the first SIGINT/SIGTERM asks torchrun to stop (SIGTERM), a second one or the
    grace period's end kills everything carrying the token."""

    def __init__(self, proc: subprocess.Popen, token: str, grace_s: float):
        self.proc, self.token, self.grace_s = proc, token, grace_s
        self.received: Optional[int] = None
        self.deadline: Optional[float] = None
        self.saved = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.saved[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.received is None:
            self.received, self.deadline = signum, time.monotonic() + self.grace_s
            _signal(self.proc, signal.SIGTERM)
        else:
            sweep(self.token)
            _signal(self.proc, signal.SIGKILL)

    def wait(self) -> int:
        while True:
            try:
                return self.proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                if self.deadline is not None and time.monotonic() > self.deadline:
                    sweep(self.token)
                    _signal(self.proc, signal.SIGKILL)


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass


def supervise(cmd: list[str], env: dict, stdout=None, stderr=None,
              grace_s: float = GRACE_S) -> Outcome:
    """Run ``cmd`` (torchrun) to the end under `plait run`'s signal handling; nothing it started
    survives this call. Signal handlers can only be installed from the main thread: elsewhere
    (a library caller's thread) the run is only swept at the end."""
    token = new_token()
    env = dict(env, **{TOKEN_VAR: token})
    proc = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        if threading.current_thread() is not threading.main_thread():
            status, received = proc.wait(), None
        else:
            with _Signals(proc, token, grace_s) as handler:
                status, received = handler.wait(), handler.received
    finally:
        if proc.poll() is None:  # an exception here (KeyboardInterrupt in a test runner...)
            _signal(proc, signal.SIGKILL)
            proc.wait()
        swept = sweep(token)
    return Outcome(status=status, signal=received, swept=swept)
