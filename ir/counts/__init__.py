"""Parameter, FLOP and byte counts: the single source of these formulas in plait (this package and
the block kinds' counts facets, ``plait/kinds/<kind>/counts.py``).

Parameters are counted exactly as the reference implementations (Megatron-Core, Hugging Face
transformers) instantiate them: every weight, bias and norm scale; buffers (RoPE frequencies, the
aux-loss-free expert bias) are not parameters.

FLOPs follow Megatron-Core's ``num_floating_point_operations`` (megatron/training/training.py):
only matrix multiplies count, 2 FLOPs per multiply-add; norms, softmax, activations and RoPE are
free. Attention's core (QK^T and scores x V) is counted *causally*: half of the s x s score matrix,
i.e. ``2 * q_dim * s`` FLOPs per token, as Megatron-Core does when it reports MFU. ``causal=False``
gives the full square (the SC'21 paper's convention). A sliding window w < s leaves the band
``s * w - w^2 / 2`` of the square (the same continuous area rule: ``s^2 / 2`` at w = s), so
attention costs ~ s * min(w, s) rather than s^2 / 2 (``attended_keys``). Training is 3x forward
(forward, dgrad, wgrad); full recomputation adds one more forward of the transformer layers (not
of the logits). Two documented departures from Megatron's formula: router GEMMs
(``2*hidden*experts``, plus ``2*hidden`` for a shared-expert gate) are counted (0.3% of
Qwen3-30B-A3B's FLOPs, less for coarser MoEs; moe's facet), and Mamba's inner width is the real
``heads * head_dim`` rather than Megatron's hard-coded ``2 * hidden`` (equal for Nemotron-H
8B/56B/47B; the pruned 4B has 7168 != 6144; mamba's facet).

Bytes are per parameter of weights, gradients and optimizer state, per precision and data-parallel
flavour, as functions of the number of data-parallel shards; activation bytes per layer and
micro-batch are in ``activations.py``.

Each block kind's own formulas (one block's parameters, FLOPs, saved bytes, FSDP shapes) live in
its counts facet, ``plait/kinds/<kind>/counts.py`` (the protocol is at the top of the attention
one); this package sums them over the model's layers, holds the pieces several kinds share (norms,
linears, feed-forward networks) and keeps each kind's public names reachable as ``counts.<name>``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Union

from .. import kinds
from ..errors import PlaitError
from ..job import Precision
from ..model import ModelSpec


def _facet(kind: str):
    return kinds.facet(kind, "counts")


def __getattr__(name: str):
    """A kind's own public names (``counts.ring_steps``, ``counts.expert_params``): each counts
    facet lists the names it adds here in ``EXPORTS``. Resolved on first use (the facets import
    this package), then kept as an ordinary attribute."""
    for kind in kinds.names():
        facet = _facet(kind)
        if name in facet.EXPORTS:
            value = globals()[name] = getattr(facet, name)
            return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------


def norm_params(model: ModelSpec, width: int | None = None) -> int:
    """One norm over ``width`` (default hidden) channels: scale, plus bias for LayerNorm."""
    width = model.hidden if width is None else width
    return width * (2 if model.norm.kind == "layernorm" else 1)


def linear_params(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def ffn_params(hidden: int, ffn: int, gated: bool, bias: bool = False) -> int:
    """A (gated) MLP hidden -> ffn -> hidden: gate+up+down when gated (SwiGLU), else up+down."""
    up = linear_params(hidden, ffn * (2 if gated else 1), bias)
    return up + linear_params(ffn, hidden, bias)


def fp32_kept_params(model: ModelSpec, kind: str, tp: int = 1) -> float:
    """Parameters of one ``kind`` block a bf16 / fp8 model keeps in fp32 on one rank (as Megatron
    does; each kind's counts facet says which)."""
    return _facet(kind).fp32_kept_params(model, tp)


def block_params(model: ModelSpec, kind: str) -> int:
    """One block of that kind, without its pre-norm."""
    return _facet(kind).params(model)


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


def _kinds_of(model: ModelSpec) -> tuple[str, ...]:
    return tuple(dict.fromkeys(model.layers))  # first-appearance order


def inactive_expert_params(model: ModelSpec) -> int:
    """Parameters a token does NOT use: the routed experts it is not sent to ((experts - top_k)
    experts per moe layer); each kind's counts facet gives its layer's share."""
    return sum(model.count(k) * _facet(k).inactive_params(model) for k in _kinds_of(model))


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
    per_kind = tuple((k, model.count(k) * layer_params(model, k)) for k in _kinds_of(model))
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


def ffn_gemms(gated: bool) -> int:
    """Stacked hidden x ffn GEMMs of an MLP: gate, up, down (SwiGLU) or up, down."""
    return 3 if gated else 2


def layer_flops(model: ModelSpec, kind: str, seq_len: int, causal: bool = True,
                index: Optional[int] = None) -> float:
    """Forward FLOPs per token of the ``index``-th layer of that kind (None: the mean over them,
    which differs from any one layer only where layers of a kind differ: attention windows)."""
    return _facet(kind).flops(model, seq_len, causal, index)


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
    logits), 'selective' re-runs what each kind's facet says (attention's core, Korthikanti et
    al.), 'none' nothing."""
    if recompute in ("none", None, False):
        return 0.0
    if recompute == "selective":
        return sum(model.count(k) * _facet(k).recompute_flops(model, seq_len, causal)
                   for k in _kinds_of(model))
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
from .state import (BF16_BYTES, FP32_BYTES, FSDP_GATHERS_PER_MICROBATCH,  # noqa: E402,F401
                    FSDP_SCATTERS_PER_MICROBATCH, FUSED_ADAM_STEP_BYTES, STATE_CLASSES,
                    STORED_WEIGHT_BYTES,
                    dp_traffic_bytes, fsdp_bytes_per_microbatch, param_state_bytes,
                    state_tensor_bytes, stored_weight_bytes)


def weight_bytes(model: ModelSpec, precision: Union[Precision, str] = "bf16") -> int:
    """Bytes of all of ``model``'s weights stored at ``precision``."""
    return params(model).total * stored_weight_bytes(precision)


# Which AdamW the runtime steps on a device and the bytes per parameter it moves: counts/optimizer.py.
from .optimizer import (ADAMW_STEP_BYTES, CLIP_BYTES, AdamWPath, adamw_path,  # noqa: E402,F401
                        torch_device_type)


# Activation bytes (what one rank's layer keeps for backward) live in counts/activations.py, the
# same single source, split off by kind of quantity; their names are this package's too.
from .activations import (LSE_BYTES, ActivationShape, ffn_saved_bytes,  # noqa: E402,F401
                          head_saved_bytes, layer_saved_bytes, norm_saved_bytes, stream_bytes,
                          tp_collective_bytes)
# Bytes the memory-bound ops move per pass (priced at HBM bandwidth; calibrate's probe): traffic.py.
from .traffic import (activation_fn_traffic, expert_loop_traffic,  # noqa: E402,F401
                      norm_residual_traffic)
# FSDP's shard dim and padding (per-tensor shapes of each layer kind on one rank): counts/fsdp.py.
from .fsdp import (Shapes, embedding_shapes, ffn_shapes, fsdp_padding,  # noqa: E402,F401
                   fsdp_shard_dim, head_shapes, layer_shapes, linear_shapes, norm_shapes, params_of)
