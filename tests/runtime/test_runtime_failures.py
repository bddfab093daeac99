"""The failure summary from the ranks' state records, and the supervisor leaving no process behind
(even one that left its parent's session, as torchrun's ranks do)."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from plait.runtime import failures
from plait.runtime.supervise import supervise


def _fail(run_dir, rank, message):
    try:
        raise RuntimeError(message)
    except RuntimeError as err:
        failures.mark(run_dir, rank, "failed", err)


def test_summary_names_the_killed_rank_first_then_the_first_error(tmp_path):
    for rank in range(3):
        failures.mark(tmp_path, rank, "started")
    _fail(tmp_path, 0, "Connection closed by peer [127.0.0.1]:123\nmore detail")
    time.sleep(0.01)
    _fail(tmp_path, 1, "Connection reset")
    text = failures.summary(tmp_path, world=4)
    lines = text.splitlines()
    assert lines[0].startswith("rank 2 died without an error") and str(tmp_path / "rank-2.log") in lines[0]
    assert lines[1] == "then rank 0 failed first: RuntimeError: Connection closed by peer [127.0.0.1]:123"
    assert lines[2] == f"  full log: {tmp_path / 'rank-0.log'}"
    assert lines[3] == "  rank 1 failed after it"
    assert lines[4].startswith("rank 3 never started")
    assert "more detail" not in text


def test_summary_of_a_collective_timeout_is_its_first_line(tmp_path):
    failures.mark(tmp_path, 0, "started")
    failures.mark(tmp_path, 1, "started")
    _fail(tmp_path, 0, "all_reduce(sum) on tp group [0, 1] timed out: rank 1 did not arrive (...)")
    failures.mark(tmp_path, 1, "stopped")
    assert failures.summary(tmp_path, 2).splitlines()[0] == (
        "rank 0 failed first: RuntimeError: all_reduce(sum) on tp group [0, 1] timed out: rank 1 did "
        "not arrive (...)")


# A parent that starts a child in a session of its own (as torchrun starts ranks), then waits.
TREE = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(600)
"""


@pytest.mark.tier2
def test_a_signal_to_the_supervisor_ends_the_whole_tree(tmp_path):
    pid_file = tmp_path / "child.pid"

    def signal_when_started():
        while not pid_file.exists() or not pid_file.read_text():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill PLAIT_RUN_PID` would

    threading.Thread(target=signal_when_started, daemon=True).start()
    out = supervise([sys.executable, "-c", TREE, str(pid_file)], dict(os.environ), grace_s=30)
    assert out.signal == signal.SIGTERM and out.status == -signal.SIGTERM
    assert out.swept == 1  # the grandchild outside the session
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_ranks_gone_without_a_word_are_led_by_torchruns_first_observed_failure(tmp_path):
    # rank 1 was SIGKILLed; rank 0 died blocked on it before it could record anything
    for rank in (0, 1):
        failures.mark(tmp_path, rank, "started")
    (tmp_path / "torchrun.log").write_text(
        "Root Cause (first observed failure):\n[0]:\n  time      : 2026-12-02_21:34:11\n"
        "  host      : localhost\n  rank      : 1 (local_rank: 1)\n  exitcode  : -9 (pid: 1)\n")
    text = failures.summary(tmp_path, 2)
    assert text.startswith("rank 1 died without an error") and "(also gone: ranks 0)" in text
    (tmp_path / "torchrun.log").write_text("no root cause block\n")
    assert failures.summary(tmp_path, 2).startswith("rank 0 died without an error")
