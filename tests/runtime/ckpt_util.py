"""Shared by the checkpoint tests: a one-rank gloo world for in-process saves and loads."""
from contextlib import contextmanager
from pathlib import Path

from plait.runtime import mesh as mesh_mod


@contextmanager
def single_rank(tmp: Path):
    mesh_mod.init_distributed("gloo", 60, f"file://{tmp}/rdzv", 0, 1)
    try:
        yield tmp
    finally:
        mesh_mod.destroy()
