"""Parameter, FLOP and byte counts: the single source of these formulas in plait.

Parameters are counted exactly as the reference implementations (Megatron-Core, Hugging Face
transformers) instantiate them: every weight, bias and norm scale; buffers (RoPE frequencies, the
aux-loss-free expert bias) are not parameters.

FLOPs follow Megatron-Core's ``num_floating_point_operations`` (megatron/training/training.py):
only matrix multiplies count, 2 FLOPs per multiply-add; norms, softmax, activations and RoPE are
free. Attention's core (QK^T and scores x V) is counted *causally*: half of the s x s score matrix,
i.e. ``2 * q_dim * s`` FLOPs per token, as Megatron-Core does when it reports MFU. ``causal=False``
gives the full square (the SC'21 paper's convention). A sliding window w < s leaves the band
``s * w - w^2 / 2`` of the square (the same continuous area rule: ``s^2 / 2`` at w = s), so
attention costs ~ s * min(w, s) rather than s^2 / 2 (``attended_keys``). Training is 3x forward (forward, dgrad,
wgrad); full recomputation adds one more forward of the transformer layers (not of the logits).
Two documented departures from Megatron's formula: router GEMMs (``2*hidden*experts``, plus
``2*hidden`` for a shared-expert gate) are counted (0.3% of Qwen3-30B-A3B's FLOPs, less for coarser
MoEs), and Mamba's inner width is the real ``heads * head_dim`` rather than Megatron's hard-coded
``2 * hidden`` (equal for Nemotron-H 8B/56B/47B; the pruned 4B has 7168 != 6144).

Bytes are per parameter of weights, gradients and optimizer state, per precision and data-parallel
flavour, as functions of the number of data-parallel shards; activation bytes per layer and
micro-batch are in ``activations.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Union

from ..errors import PlaitError
from ..job import Precision
from ..model import Attention, Mamba2, MLP, ModelSpec, MoE
from .latent import latent_gemms, latent_norm_params, latent_widths  # noqa: F401
from .windows import attended_keys, attention_windows, ring_exchanges, ring_steps  # noqa: F401

# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------


def norm_params(model: ModelSpec, width: int | None = None) -> int:
    """One norm over ``width`` (default hidden) channels: scale, plus bias for LayerNorm."""
    width = model.hidden if width is None else width
    return width * (2 if model.norm.kind == "layernorm" else 1)


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def attention_gemms(attn: Attention, hidden: int, tp: int = 1) -> tuple[tuple[float, float], ...]:
    """(out, in) widths of attention's projection GEMMs per token on one of ``tp`` ranks, o_proj
    last: GQA's fused q/k/v and o, or multi-head latent attention's down / up projections
    (counts/latent.py). The cost model times these same GEMMs."""
    if attn.latent is not None:
        return latent_gemms(attn, hidden, tp)
    return ((attn.q_dim + 2 * attn.kv_dim) / tp, hidden), (hidden, attn.q_dim / tp)


def rotated_width(attn: Attention, tp: int = 1) -> float:
    """Channels RoPE rotates per token on one of ``tp`` ranks: every q and k head (GQA), or MLA's
    rotary part of each q head plus its one rotary key shared by all heads (replicated)."""
    if attn.latent is not None:
        return attn.heads / tp * attn.rope_dim + attn.rope_dim
    return (attn.q_dim + attn.kv_dim) / tp


def attention_gemm_weights(attn: Attention, hidden: int) -> int:
    """Weights of attention's projection GEMMs (one multiply-add each per token)."""
    return int(sum(n_out * n_in for n_out, n_in in attention_gemms(attn, hidden)))


def attention_params(model: ModelSpec, attn: Attention) -> int:
    """Projections (+ biases) and norms inside the block (GQA's per-head q/k norms, MLA's latent
    norms); no pre-norm."""
    h = model.hidden
    biases = (attn.q_dim + 2 * attn.kv_dim if attn.qkv_bias else 0) + (h if attn.out_bias else 0)
    qk_norm = 2 * attn.head_dim if attn.qk_norm else 0  # RMSNorm scales, shared across heads
    latent_norms = latent_norm_params(attn) if attn.latent is not None else 0
    return attention_gemm_weights(attn, h) + biases + qk_norm + latent_norms


def ffn_params(hidden: int, ffn: int, gated: bool, bias: bool = False) -> int:
    """A (gated) MLP hidden -> ffn -> hidden: gate+up+down when gated (SwiGLU), else up+down."""
    up = _linear(hidden, ffn * (2 if gated else 1), bias)
    return up + _linear(ffn, hidden, bias)


def mlp_params(model: ModelSpec, mlp: MLP) -> int:
    return ffn_params(model.hidden, mlp.ffn, mlp.gated, mlp.bias)


def one_expert_params(model: ModelSpec) -> int:
    """One routed expert of the MoE block."""
    moe = model.block("moe")
    return ffn_params(model.hidden, moe.ffn, moe.gated)


def expert_params(model: ModelSpec) -> int:
    """Routed-expert parameters of ONE moe layer (all experts)."""
    return model.block("moe").experts * one_expert_params(model)


def router_params(model: ModelSpec) -> int:
    """Router Linear(hidden, experts) plus the shared expert's sigmoid gate Linear(hidden, 1)."""
    moe = model.block("moe")
    return model.hidden * moe.experts + (model.hidden if moe.shared_gate else 0)


def shared_expert_params(model: ModelSpec) -> int:
    moe = model.block("moe")
    return ffn_params(model.hidden, moe.shared_ffn, moe.gated) if moe.shared_ffn else 0


def moe_params(model: ModelSpec) -> int:
    """One MoE block without its pre-norm: router, routed experts, shared expert (+ gate)."""
    return router_params(model) + expert_params(model) + shared_expert_params(model)


def mamba_params(model: ModelSpec, m: Mamba2) -> int:
    """Mamba2 mixer: in_proj -> [z, x, B, C, dt]; depthwise conv over x, B, C; per-head dt_bias,
    A_log and D; gated RMSNorm over d_inner; out_proj."""
    h = model.hidden
    in_proj = _linear(h, m.in_proj_out, m.proj_bias)
    conv = m.conv_channels * m.conv + (m.conv_channels if m.conv_bias else 0)
    per_head = 3 * m.heads  # dt_bias, A_log, D
    gated_norm = m.d_inner  # always an RMSNorm scale
    out_proj = _linear(m.d_inner, h, m.proj_bias)
    return in_proj + conv + per_head + gated_norm + out_proj


def fp32_kept_params(model: ModelSpec, kind: str, tp: int = 1) -> float:
    """Parameters of one ``kind`` block a bf16 / fp8 model keeps in fp32 on one rank (as Megatron
    does): the MoE router (replicated over TP), Mamba's per-head A_log, D and dt_bias (split by TP
    with the heads)."""
    if kind == "moe":
        return model.hidden * model.block("moe").experts
    if kind == "mamba":
        return 3 * model.block("mamba").heads / tp
    return 0.0


def block_params(model: ModelSpec, kind: str) -> int:
    """One block of that kind, without its pre-norm."""
    spec = model.block(kind)
    if kind == "attention":
        return attention_params(model, spec)
    if kind == "mlp":
        return mlp_params(model, spec)
    if kind == "moe":
        return moe_params(model)
    return mamba_params(model, spec)


def layer_params(model: ModelSpec, kind: str) -> int:
    """One layer of that block kind, including its pre-norm."""
    return norm_params(model) + block_params(model, kind)


def embedding_params(model: ModelSpec) -> int:
    """Input embedding, plus learned absolute positions (max_seq x hidden) when the model has them."""
    if model.learned_positions and not model.max_seq:
        raise PlaitError(f"model {model.name!r} has learned positions but no max_seq")
    positions = model.max_seq * model.hidden if model.learned_positions else 0
    return model.vocab * model.hidden + positions


def head_params(model: ModelSpec) -> int:
    """Output projection hidden -> vocab (no bias); 0 when tied to the embedding."""
    return 0 if model.tie_embeddings else model.vocab * model.hidden


def final_norm_params(model: ModelSpec) -> int:
    return norm_params(model)


def params_per_layer(model: ModelSpec) -> tuple[int, ...]:
    """Parameters of each layer in order (pre-norm included; embedding, final norm, head not)."""
    per_kind = {kind: layer_params(model, kind) for kind in set(model.layers)}
    return tuple(per_kind[kind] for kind in model.layers)


def inactive_expert_params(model: ModelSpec) -> int:
    """Routed-expert parameters a token does NOT use: (experts - top_k) experts per moe layer."""
    if not model.is_moe:
        return 0
    moe = model.block("moe")
    return model.count("moe") * (moe.experts - moe.top_k) * one_expert_params(model)


@dataclass(frozen=True)
class ParamCounts:
    """total = embedding + sum(layers) + final_norm + head. ``non_embedding`` excludes the
    vocabulary-sized matrices (embedding, positions and untied head). ``active`` is what one token
    touches: everything except the routed experts it is not sent to (router and shared experts
    included)."""

    total: int
    active: int
    embedding: int
    head: int
    final_norm: int
    non_embedding: int
    per_kind: tuple[tuple[str, int], ...]  # (kind, params in all layers of that kind), model order

    def of_kind(self, kind: str) -> int:
        return dict(self.per_kind).get(kind, 0)


def params(model: ModelSpec) -> ParamCounts:
    kinds = tuple(dict.fromkeys(model.layers))  # first-appearance order
    per_kind = tuple((k, model.count(k) * layer_params(model, k)) for k in kinds)
    embedding, head, final = embedding_params(model), head_params(model), final_norm_params(model)
    total = embedding + head + final + sum(n for _, n in per_kind)
    return ParamCounts(
        total=total,
        active=total - inactive_expert_params(model),
        embedding=embedding,
        head=head,
        final_norm=final,
        non_embedding=total - embedding - head,
        per_kind=per_kind,
    )


# ----------------------------------------------------------------------------------------------
# FLOPs (forward, per token; see the module docstring for the conventions)
# ----------------------------------------------------------------------------------------------

TRAINING_PASSES = 3  # forward + backward dgrad + backward wgrad: every GEMM three times


def _ffn_gemms(gated: bool) -> int:
    """Stacked hidden x ffn GEMMs of an MLP: gate, up, down (SwiGLU) or up, down."""
    return 3 if gated else 2


def attention_core_flops(model: ModelSpec, seq_len: int, causal: bool = True,
                         index: Optional[int] = None) -> float:
    """QK^T and scores x V per token: ``2 * heads * (head_dim + v_head_dim) * keys`` (GQA: 4 * q_dim
    * keys) with ``attended_keys`` keys, of the
    ``index``-th attention layer, or the mean over the attention layers (index None), so that
    count("attention") * this is their total."""
    attn = model.block("attention")
    if index is not None:
        keys = attended_keys(seq_len, attn.window_of(index), causal)
    else:
        windows = attention_windows(model) or (attn.window,)
        keys = sum(attended_keys(seq_len, w, causal) for w in windows) / len(windows)
    return 2 * attn.heads * (attn.head_dim + attn.v_head_dim) * keys


def attention_flops(model: ModelSpec, seq_len: int, causal: bool = True,
                    index: Optional[int] = None) -> float:
    projections = 2 * attention_gemm_weights(model.block("attention"), model.hidden)
    return projections + attention_core_flops(model, seq_len, causal, index)


def mlp_flops(model: ModelSpec) -> float:
    mlp = model.block("mlp")
    return float(2 * model.hidden * mlp.ffn * _ffn_gemms(mlp.gated))


def router_flops(model: ModelSpec) -> float:
    """Router GEMM (+ shared-expert gate); Megatron's formula leaves these out (0.3% of Qwen3-30B-A3B's
    training FLOPs, less for coarser MoEs)."""
    return float(2 * router_params(model))


def moe_flops(model: ModelSpec) -> float:
    """top_k routed experts + the shared expert + the router, per token."""
    moe = model.block("moe")
    expert_width = moe.top_k * moe.ffn + moe.shared_ffn
    return 2 * model.hidden * expert_width * _ffn_gemms(moe.gated) + router_flops(model)


def mamba_flops(model: ModelSpec) -> float:
    """Megatron's hybrid formula: in_proj, a 7 * d_inner * state scan estimate, out_proj."""
    m = model.block("mamba")
    h = model.hidden
    return float(2 * h * m.in_proj_out + 7 * m.d_inner * m.state + 2 * m.d_inner * h)


def layer_flops(model: ModelSpec, kind: str, seq_len: int, causal: bool = True,
                index: Optional[int] = None) -> float:
    """Forward FLOPs per token of the ``index``-th layer of that kind (None: the mean over them,
    which differs from any one layer only where layers of a kind differ: attention windows)."""
    if kind == "attention":
        return attention_flops(model, seq_len, causal, index)
    if kind == "mlp":
        return mlp_flops(model)
    if kind == "moe":
        return moe_flops(model)
    if kind == "mamba":
        return mamba_flops(model)
    raise KeyError(f"unknown block kind {kind!r}")


def logits_flops(model: ModelSpec) -> float:
    """Forward FLOPs per token of the output projection (tied or not)."""
    return float(2 * model.hidden * model.vocab)


@lru_cache(maxsize=256)  # the planner asks once per plan it evaluates; models are frozen values
def per_layer_flops(model: ModelSpec, seq_len: int, causal: bool = True) -> tuple[float, ...]:
    """Forward FLOPs per token of each layer in order; their sum + logits_flops = forward total."""
    seen: dict[str, int] = {}
    out = []
    for kind in model.layers:
        index = seen[kind] = seen.get(kind, -1) + 1
        out.append(layer_flops(model, kind, seq_len, causal, index))
    return tuple(out)


def forward_flops_per_token(model: ModelSpec, seq_len: int, causal: bool = True) -> float:
    return sum(per_layer_flops(model, seq_len, causal)) + logits_flops(model)


def recompute_flops_per_token(model: ModelSpec, seq_len: int, recompute: str = "full",
                              causal: bool = True) -> float:
    """Extra forward FLOPs per token re-done in backward: 'full' re-runs every layer (not the
    logits), 'selective' re-runs attention's core only (Korthikanti et al.), 'none' nothing."""
    if recompute in ("none", None, False):
        return 0.0
    if recompute == "selective":
        return model.count("attention") * attention_core_flops(model, seq_len, causal)
    if recompute in ("full", True):
        return float(sum(per_layer_flops(model, seq_len, causal)))
    raise PlaitError(f"unknown recompute {recompute!r}", hint="one of none, selective, full")


def flops_per_token(model: ModelSpec, seq_len: int, training: bool = True,
                    recompute: str = "none", causal: bool = True) -> float:
    """Model FLOPs per token: forward, or training = 3x forward (Megatron). ``recompute`` adds
    the re-done forward work (hardware FLOPs); MFU as Megatron reports it uses recompute='none'."""
    forward = forward_flops_per_token(model, seq_len, causal)
    if not training:
        return forward
    return TRAINING_PASSES * forward + recompute_flops_per_token(model, seq_len, recompute, causal)


# Bytes of weights, gradients and optimizer state per parameter live in counts/state.py.
from .state import (_BF16, _FP32, STATE_CLASSES, STORED_WEIGHT_BYTES,  # noqa: E402,F401
                    param_state_bytes, state_tensor_bytes, stored_weight_bytes)


def weight_bytes(model: ModelSpec, precision: Union[Precision, str] = "bf16") -> int:
    """Bytes of all of ``model``'s weights stored at ``precision``."""
    return params(model).total * stored_weight_bytes(precision)


# Activation bytes (what one rank's layer keeps for backward) live in counts/activations.py, the
# same single source, split off by kind of quantity; their names are this package's too.
from .activations import (SAVED_BYTES, ActivationShape, attention_saved_bytes,  # noqa: E402,F401
                          attention_selective_bytes, head_saved_bytes, layer_saved_bytes,
                          mamba_saved_bytes, mamba_selective_bytes, mlp_saved_bytes,
                          mlp_selective_bytes, moe_saved_bytes, moe_selective_bytes,
                          norm_saved_bytes, stream_bytes)
# FSDP's shard dim and padding (per-tensor shapes of each layer kind on one rank): counts/fsdp.py.
from .fsdp import (embedding_shapes, fsdp_padding, fsdp_shard_dim, head_shapes,  # noqa: E402,F401
                   layer_shapes, params_of)
