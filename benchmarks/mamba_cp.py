"""Mamba2 under context parallelism: what each design moves per Mamba layer and rank (forward, one
micro-batch sequence) and what the planner's alpha-beta model makes of it on DGX H100.

  all-to-all  (Megatron-Core): x, B, C and dt from sequence to head sharding before the conv and
              scan, y back after: every rank scatters its t local tokens' values, (cp-1)/cp leaving
  state pass  (plait, lowering/mamba_cp.py): one all-gather of the 2*cp chunks' fp32 final states
              (heads/tp * head_dim * state each) and decays, one of the conv halos (conv-1 tokens)

The all-to-all volume grows with the sequence, the state exchange does not; the table shows where
each is cheaper. tp = 8 inside a node, cp groups across nodes, bf16 activations.

    .venv/bin/python benchmarks/mamba_cp.py
"""
from __future__ import annotations

import sys
from dataclasses import replace

from rich.console import Console
from rich.table import Table

from plait.ir.dsl import load_job, load_model
from plait.ir.plan import Layout
from plait.kinds.mamba import cost as mamba_cost
from plait.planner.cost import comm
from plait.planner.cost.context import Context

MODELS = ("nemotron-h-8b", "nemotron-h-56b")
JOB = "specs/jobs/nemotron-h-56b-pretrain.plait"


def alltoall_bytes(ctx: Context) -> float:
    """Local bytes one rank scatters: xBC and dt out, y back."""
    m, lay = ctx.model.mamba, ctx.layout
    per_token = (m.conv_channels + m.heads + m.d_inner) / lay.tp * ctx.act_bytes
    return ctx.tokens * per_token


def state_bytes(ctx: Context) -> float:
    m, lay = ctx.model.mamba, ctx.layout
    chunks = 2 * lay.cp * lay.mbs
    return chunks * (m.heads / lay.tp * (m.head_dim * m.state + 1) * 4
                     + (m.conv - 1) * m.conv_channels / lay.tp * ctx.act_bytes)


def main() -> int:
    base = load_job(JOB)
    table = Table(title="Mamba2 CP per layer and rank, forward: all-to-all vs state passing (DGX H100)")
    for col in ("model", "seq", "cp", "a2a MB", "state MB", "a2a ms", "state ms", "cheaper"):
        table.add_column(col, justify="left" if col in ("model", "cheaper") else "right")
    for name in MODELS:
        model = load_model(f"specs/models/{name}.plait")
        for seq, cp in ((8192, 2), (131072, 8), (1 << 20, 32)):
            job = replace(base, model=model, seq_len=seq)
            ctx = Context(job, Layout(tp=8, cp=cp, dp=base.cluster.world // (8 * cp), sp=True))
            g = ctx.group("dense", "cp")
            a2a_s = comm.all_to_all(ctx, g, alltoall_bytes(ctx))
            state_s = mamba_cost.cp_comm(ctx)
            table.add_row(name, f"{seq // 1024}K", str(cp), f"{alltoall_bytes(ctx) / 1e6:.1f}",
                          f"{state_bytes(ctx) / 1e6:.1f}", f"{a2a_s * 1e3:.2f}",
                          f"{state_s * 1e3:.2f}", "state" if state_s < a2a_s else "all-to-all")
    Console(width=130).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
