"""Shared by the checkpoint tests: a small dense model and its parity setup, and a one-rank gloo
world for in-process saves and loads."""
from contextlib import contextmanager
from pathlib import Path

from plait.ir.model import MLP, Attention, ModelSpec, Rope
from plait.runtime import mesh as mesh_mod
from plait.runtime.harness.parity import Setup

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "specs" / "jobs" / "tiny-local.plait"
SPEC = ModelSpec(name="ckpt-test", vocab=64, hidden=32, layers=("attention", "mlp") * 2,
                 attention=Attention(heads=4, kv_heads=2, head_dim=8, rope=Rope()),
                 mlp=MLP(ffn=48))
SETUP = Setup(SPEC, global_batch=4, seq=8, steps=4)


@contextmanager
def single_rank(tmp: Path):
    mesh_mod.init_distributed("gloo", 60, f"file://{tmp}/rdzv", 0, 1)
    try:
        yield tmp
    finally:
        mesh_mod.destroy()
