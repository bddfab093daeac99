"""Host-cost probes behind `plait calibrate`: plait's own blocks, built by its lowering, on a few
tokens of a narrow width, so their forward + backward time is dispatch, launches and Python, not
arithmetic (the cost model's host_us_KIND and kernel_us, planner/cost/context.py).

A MoE block's host work grows with its local experts where torch._grouped_mm does not run (the
loop path of lowering/modules/experts.py: two linears per expert and pass) and with a shared
expert, so the MoE block is timed three ways, interleaved over ROUNDS:

    E2   2 local experts       E8   8 local experts       S   2 local experts + a shared expert
    host_us_moe_expert = (E8 - E2) / 6     host_us_moe = E2 - 2 x host_us_moe_expert
    host_us_moe_shared = S - E2

so a layout's MoE block is charged host_us_moe + its local experts (experts / ep) x
host_us_moe_expert, + host_us_moe_shared with a shared expert (plait/kinds/moe/cost.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .calibrate_timing import representative, timed

HOST_KINDS = ("attention", "mlp", "mamba")
MOE_VARIANTS = {"E2": (2, False), "E8": (8, False), "S": (2, True)}  # (local experts, shared)
ROUNDS = 5  # the variants' interleaved rounds; each keeps its representative (calibrate_timing)
TOKENS = 4
WIDTH = 16


def block_host_seconds(device, dtype) -> float:
    """One tiny decoder block's forward (norm, q/k/v/o, SDPA, norm, gated MLP, two residual adds)
    on one token of width 8: all overhead, no arithmetic to speak of."""
    x = torch.randn(1, 1, 8, dtype=dtype, device=device)
    ws = [torch.randn(8, 8, dtype=dtype, device=device) for _ in range(7)]

    def block():
        h = F.rms_norm(x, (8,))
        q, k, v = (F.linear(h, w).view(1, 1, 2, 4).transpose(1, 2) for w in ws[:3])
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(1, 1, 8)
        y = x + F.linear(a, ws[3])
        h = F.rms_norm(y, (8,))
        return y + F.linear(F.silu(F.linear(h, ws[4])) * F.linear(h, ws[5]), ws[6])

    return timed(block, device, repeat=50, warmup=10)


def host_model(kinds: tuple[str, ...], experts: int = 2, shared: bool = False):
    """A narrow model of ``kinds`` built by plait's own lowering (the modules the runtime runs)."""
    from plait.ir.model import MLP, Attention, Mamba2, ModelSpec, MoE, Rope
    from plait.lowering.build import build_model

    moe = MoE(experts=experts, top_k=2, ffn=WIDTH, shared_ffn=2 * WIDTH if shared else 0,
              shared_gate=shared)
    spec = ModelSpec(name="host-probe", vocab=32, hidden=WIDTH, layers=kinds, max_seq=64,
                     attention=Attention(heads=2, kv_heads=1, head_dim=8, rope=Rope(theta=1e4)),
                     mlp=MLP(ffn=2 * WIDTH), moe=moe,
                     mamba=Mamba2(heads=4, head_dim=8, groups=1, state=8, chunk=16))
    return build_model(spec)


def _pass_us(layer, device, dtype) -> float:
    """Microseconds of one block's forward + backward on TOKENS tokens, its representative
    repeat (calibrate_timing.timed)."""
    x = torch.randn(1, TOKENS, WIDTH, dtype=dtype, device=device, requires_grad=True)

    def step():
        layer(x).sum().backward()

    return timed(step, device, repeat=20, warmup=5) * 1e6


def block_host_us(device, dtype) -> dict:
    """{kind: microseconds of one block's forward + backward (norm, mixer, residual)} for
    HOST_KINDS, and "moe_variants": {variant: microseconds} of MOE_VARIANTS."""
    model = host_model(HOST_KINDS).to(device=device, dtype=dtype)
    out: dict = {kind: _pass_us(layer, device, dtype) for kind, layer in zip(HOST_KINDS, model.layers)}
    layers = {name: host_model(("moe",), e, s).layers[0].to(device=device, dtype=dtype)
              for name, (e, s) in MOE_VARIANTS.items()}
    rounds = [{name: _pass_us(layer, device, dtype) for name, layer in layers.items()}
              for _ in range(ROUNDS)]
    out["moe_variants"] = {name: representative([r[name] for r in rounds]) for name in layers}
    return out


def host_values(host_us: dict, statistic: str = "min") -> tuple[dict, dict]:
    """({host_us_KIND, host_us_moe_expert, host_us_moe_shared}, {key: how measured}) from
    block_host_us's dict."""
    blocks = dict(host_us)
    moe = blocks.pop("moe_variants", None)
    values = {f"host_us_{kind}": us for kind, us in blocks.items()}
    sources = {f"host_us_{kind}": f"forward + backward of plait's {kind} block on {TOKENS} tokens"
               for kind in blocks}
    if moe:
        per_expert = max(0.0, (moe["E8"] - moe["E2"]) / 6)
        values["host_us_moe_expert"] = per_expert
        values["host_us_moe"] = max(0.0, moe["E2"] - 2 * per_expert)
        values["host_us_moe_shared"] = max(0.0, moe["S"] - moe["E2"])
        how = (f"forward + backward of plait's moe block on {TOKENS} tokens, {statistic} of "
               f"{ROUNDS} interleaved rounds: 2 local experts {moe['E2']:.0f} us, 8 "
               f"{moe['E8']:.0f} us, 2 + a shared expert {moe['S']:.0f} us -> per local expert, "
               f"the block without them, the shared expert")
        for key in ("host_us_moe", "host_us_moe_expert", "host_us_moe_shared"):
            sources[key] = how
    return values, sources
