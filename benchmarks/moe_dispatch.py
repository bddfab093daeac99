"""Token-dispatcher micro-benchmark on 4 CPU ranks (gloo, one thread each): forward + backward of
one expert-parallel MoE layer (8 experts, top-2, hidden 128, expert ffn 256, 1024 tokens per rank)
for each dispatcher, expert layout and drop mode. Prints tokens/s over the 4 ranks (median step,
slowest rank), the share of routed choices dropped, and the bytes one rank sends per step (token
rows / count metadata), counted by the dispatcher's collectives.

    .venv/bin/python benchmarks/moe_dispatch.py [--steps 6]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_ranks import expert_layer, mesh_for, run_ranks  # noqa: E402

from plait.ir.job import MoEOptions  # noqa: E402
from plait.ir.model import MoE  # noqa: E402
from plait.ir.plan import Layout  # noqa: E402
from plait.lowering.modules import routing  # noqa: E402
from plait.lowering.moe import comm  # noqa: E402

WORLD, HIDDEN, TOKENS = 4, 128, 1024
SPEC = MoE(experts=8, top_k=2, ffn=256, aux_loss=0.01)
LAYOUTS = {"ep4": Layout(dp=4, ep=4), "ep2 x etp2": Layout(dp=4, ep=2, etp=2)}
MODES = {
    "dropless": {},
    "cf 1.0 probs": dict(capacity_factor=1.0, drop_policy="probs"),
    "cf 1.0 position": dict(capacity_factor=1.0, drop_policy="position"),
    "cf 1.0 probs + pad": dict(capacity_factor=1.0, drop_policy="probs", pad_to_capacity=True),
}


def dropped_share(layer, x: torch.Tensor, options: MoEOptions) -> float:
    if options.capacity_factor is None:
        return 0.0
    with torch.no_grad():
        w, i, _ = routing.route(layer.router(x.float()), None, top_k=SPEC.top_k, router="softmax",
                                pre_softmax=False, norm_topk=True, groups=1, topk_groups=1,
                                scaling_factor=1.0)
        keep = routing.capacity_keep(w, i, SPEC.experts, options.capacity_factor, options.drop_policy)
    return float((~keep).float().mean())


def bench_case(rank: int, layout: Layout, options: MoEOptions, steps: int) -> dict:
    layer = expert_layer(SPEC, HIDDEN, layout, options, rank)
    x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(100 + rank))
    group = mesh_for(layout).groups["world"]
    times, sent = [], None
    for _ in range(steps + 1):  # the first step warms up
        layer.zero_grad(set_to_none=True)
        dist.barrier(group)
        start = time.perf_counter()
        with comm.counting() as sent:
            layer(x.clone().requires_grad_()).square().sum().backward()
        times.append(time.perf_counter() - start)
    return {"time": statistics.median(times[1:]), "rows": sent.total(comm.TOKEN_OPS),
            "meta": sent.total(comm.META_OPS), "dropped": dropped_share(layer, x, options)}


def bench(rank: int, world: int, steps: int) -> dict:
    out = {}
    for lname, layout in LAYOUTS.items():
        for dispatcher in ("alltoall", "allgather"):
            for mode, kw in MODES.items():
                options = MoEOptions(dispatcher=dispatcher, **kw)
                out[(lname, dispatcher, mode)] = bench_case(rank, layout, options, steps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    results = run_ranks(bench, WORLD, args.steps)
    table = Table(title=f"MoE token dispatch, {WORLD} gloo ranks, {TOKENS} tokens/rank, "
                        f"E={SPEC.experts} top-{SPEC.top_k} h={HIDDEN} ffn={SPEC.ffn}, fwd+bwd")
    for col in ("experts", "dispatcher", "drop mode", "tokens/s", "dropped", "KiB sent/rank",
                "KiB routing/rank"):
        table.add_column(col, justify="left" if col in ("experts", "dispatcher", "drop mode") else "right")
    for key in results[0]:
        slowest = max(r[key]["time"] for r in results)
        mean = lambda f: statistics.mean(r[key][f] for r in results)  # noqa: E731
        table.add_row(*key, f"{WORLD * TOKENS / slowest:,.0f}", f"{mean('dropped'):.1%}",
                      f"{mean('rows') / 1024:,.0f}", f"{mean('meta') / 1024:,.2f}")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
