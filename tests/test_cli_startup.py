"""Commands that only read specs or plan do not import torch (issue: every command paid ~2 CPU s
of torch import before doing anything). Each runs in a fresh interpreter, the way a user runs it."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOB = "specs/jobs/tiny-local.plait"
MOE_JOB = "specs/jobs/mixtral-8x22b-128gpu.plait"

PROBE = ("import sys; from plait.cli import main; rc = main(sys.argv[1:]); "
         "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr); sys.exit(rc)")

COMMANDS = {
    "check": ["check", JOB],
    "show": ["show", "specs/models/mixtral-8x22b.plait"],
    "fmt": ["fmt", "specs/models/llama-3.1-8b.plait"],
    "plan": ["plan", MOE_JOB],
    "estimate": ["estimate", MOE_JOB, "--layout", "tp=2 pp=8 ep=8 etp=1"],
    "groups": ["groups", JOB, "--layout", "tp=2 pp=2 dp=2"],
    "export megatron": ["export", "megatron", MOE_JOB],
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_spec_and_planning_commands_do_not_import_torch(name):
    out = subprocess.run([sys.executable, "-c", PROBE, *COMMANDS[name]], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "NO-TORCH"


def test_the_probe_sees_torch_when_a_command_needs_it():
    """The probe itself can fail: `doctor` needs torch and the probe says so."""
    out = subprocess.run([sys.executable, "-c", PROBE, "doctor"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "TORCH"
