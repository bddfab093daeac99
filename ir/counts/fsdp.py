"""FSDP2's shard padding: the parameters one rank holds beyond ``params / shards``.

torch's fully_shard splits every parameter along dim 0 into ``shards`` equal chunks, padding dim 0
up to a multiple of ``shards`` (each rank's chunk has ceil(rows / shards) rows; the last ranks'
chunks are short or empty, but every rank allocates the padded size). So the first rank of the
group holds ``(params + padding) / shards`` parameters, with

    padding = sum over tensors of (-rows mod shards) * elements per row

for the rank's (TP / EP / ETP-local) tensors. A Qwen2-MoE shared-expert gate [1, hidden] over 2
ranks pads one row of ``hidden``; tensors whose rows divide by ``shards`` pad nothing.

The planner adds this padding for the dense tensors. Grouped expert tensors [experts / ep, ...]
are costed as Megatron-FSDP shards them (flat buffers over EDP, no per-tensor padding): plait's
runtime pads their dim 0 too, which costs nothing while dp * cp divides experts / ep (the runtime
runs FSDP with experts only when edp = dp * cp) but up to a whole expert per rank otherwise (e.g.
8 experts over 128 ranks); sharding them along a divisible dim is the runtime's open fix.

The tensors are listed here per layer kind, as (rows, elements per row) on one rank: the same
modules lowering/build.py instantiates and the TP / EP splits lowering/passes apply. The test
tests/ir/test_counts_fsdp.py checks that they add up to the parameter counts of counts/__init__.py
(the one source of those) for every spec in the library.
"""
from __future__ import annotations

from typing import Iterable

from ..model import ModelSpec

Rows = tuple[tuple[int, int], ...]  # (dim-0 rows, elements per row) of each tensor


def _linear(n_in: int, n_out: int, bias: bool, out_parts: int = 1, in_parts: int = 1) -> Rows:
    """nn.Linear(n_in, n_out): weight [n_out / out_parts, n_in / in_parts], bias [n_out / out_parts]
    (a row-parallel linear's bias, added after the reduction, stays whole: out_parts = 1)."""
    rows = n_out // out_parts
    return ((rows, n_in // in_parts),) + (((rows, 1),) if bias else ())


def norm_rows(model: ModelSpec, width: int | None = None) -> Rows:
    """Scale (and LayerNorm's bias) of one norm over ``width`` (default hidden) channels."""
    width = model.hidden if width is None else width
    return ((width, 1),) * (2 if model.norm.kind == "layernorm" else 1)


def _attention(model: ModelSpec, tp: int) -> Rows:
    a, h = model.attention, model.hidden
    out = (_linear(h, a.q_dim, a.qkv_bias, tp) + _linear(h, a.kv_dim, a.qkv_bias, tp) * 2
           + _linear(a.q_dim, h, False, in_parts=tp) + (((h, 1),) if a.out_bias else ()))
    return out + (((a.head_dim, 1),) * 2 if a.qk_norm else ())


def _ffn(hidden: int, ffn: int, gated: bool, bias: bool, tp: int) -> Rows:
    up = _linear(hidden, ffn, bias, tp) * (2 if gated else 1)
    return up + _linear(ffn, hidden, False, in_parts=tp) + (((hidden, 1),) if bias else ())


def _mamba(model: ModelSpec, tp: int) -> Rows:
    m, h = model.mamba, model.hidden
    channels = m.conv_channels // tp
    return (_linear(h, m.in_proj_out, m.proj_bias, tp)
            + ((channels, m.conv),) + (((channels, 1),) if m.conv_bias else ())
            + ((m.heads // tp, 1),) * 3  # dt_bias, A_log, D
            + ((m.d_inner // tp, 1),)  # the gated norm's scale
            + _linear(m.d_inner, h, False, in_parts=tp) + (((h, 1),) if m.proj_bias else ()))


def _moe_dense(model: ModelSpec, tp: int) -> Rows:
    """Router [experts, hidden] and the shared expert's gate [1, hidden] (replicated over TP); the
    shared expert, a dense MLP sharded over TP."""
    moe, h = model.moe, model.hidden
    out = ((moe.experts, h),) + (((1, h),) if moe.shared_gate else ())
    return out + (_ffn(h, moe.shared_ffn, moe.gated, False, tp) if moe.shared_ffn else ())


def _moe_experts(model: ModelSpec, ep: int, etp: int) -> Rows:
    """Grouped routed experts [experts / ep, (2)ffn / etp, hidden] and [experts / ep, hidden, ffn / etp]."""
    moe, h = model.moe, model.hidden
    local, ffn = moe.experts // ep, moe.ffn // etp
    return ((local, (2 if moe.gated else 1) * ffn * h), (local, h * ffn))


def layer_rows(model: ModelSpec, kind: str, tp: int = 1, ep: int = 1, etp: int = 1) -> tuple[Rows, Rows]:
    """(dense, expert) tensors of one layer of ``kind`` (pre-norm included) on one rank."""
    dense = norm_rows(model)
    if kind == "attention":
        return dense + _attention(model, tp), ()
    if kind == "mlp":
        mlp = model.mlp
        return dense + _ffn(model.hidden, mlp.ffn, mlp.gated, mlp.bias, tp), ()
    if kind == "mamba":
        return dense + _mamba(model, tp), ()
    if kind == "moe":
        return dense + _moe_dense(model, tp), _moe_experts(model, ep, etp)
    raise ValueError(f"unknown layer kind {kind!r}")


def embedding_rows(model: ModelSpec, tp: int = 1) -> Rows:
    """The vocabulary-parallel embedding [vocab / tp, hidden] and learned positions [max_seq, hidden]."""
    out = ((model.vocab // tp, model.hidden),)
    return out + (((model.max_seq, model.hidden),) if model.learned_positions else ())


def head_rows(model: ModelSpec, tp: int = 1, own_copy: bool = False) -> Rows:
    """The final norm and the output head [vocab / tp, hidden]; a tied head only when the last
    stage keeps its ``own_copy`` of the embedding."""
    head = () if model.tie_embeddings and not own_copy else ((model.vocab // tp, model.hidden),)
    return norm_rows(model) + head


def fsdp_padding(rows: Iterable[tuple[int, int]], shards: int) -> int:
    """Parameters FSDP2 adds when it pads each tensor's dim 0 to a multiple of ``shards``."""
    return sum((-n % shards) * per_row for n, per_row in rows)


def params_of(rows: Iterable[tuple[int, int]]) -> int:
    return sum(n * per_row for n, per_row in rows)
