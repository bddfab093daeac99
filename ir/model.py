"""Model IR: the architecture of a Transformer / MoE / hybrid Mamba model as frozen dataclasses.

A model is a sequence of *layers*; each layer is one block (attention, mlp, moe or mamba) with a
pre-norm and a residual connection, as in Megatron's hybrid models. A Llama decoder layer is
therefore two layers here: ``[attention, mlp]``. The vocabulary of block kinds is the registry's
(ir/kinds.py); each kind's block dataclass is here, every stage shares it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Optional, Union

from . import kinds

BLOCK_KINDS: tuple[str, ...] = kinds.names()  # the registry's (ir/kinds.py)
# Megatron-Core hybrid pattern symbols.
PATTERN_SYMBOLS: dict[str, str] = kinds.by_symbol()
ACTIVATIONS: tuple[str, ...] = ("swiglu", "gelu", "relu2")
GATED_ACTIVATIONS: tuple[str, ...] = ("swiglu",)


@dataclass(frozen=True)
class Norm:
    kind: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    eps: float = 1e-5


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: ``linear(factor)``, ``yarn(factor, original_max_positions,
    beta_fast, beta_slow)`` or Llama 3's ``llama3(factor, original_max_positions, low_freq_factor,
    high_freq_factor)``."""

    kind: Literal["linear", "yarn", "llama3"]
    factor: float
    original_max_positions: Optional[int] = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # YaRN's magnitude terms (DeepSeek-V2/V3 configs): with both set, cos and sin are scaled by
    # m(mscale) / m(mscale_all_dim), m(x) = 0.1 * x * ln(factor) + 1, instead of m(1); multi-head latent
    # attention also multiplies its softmax scale by m(mscale_all_dim)^2 (transformers' DeepSeek-V3).
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None


@dataclass(frozen=True)
class Rope:
    theta: float = 10000.0
    scaling: Optional[RopeScaling] = None


@dataclass(frozen=True)
class LatentKV:
    """Multi-head latent attention (DeepSeek-V2/V3): queries through an optional low-rank
    ``q_lora_rank`` bottleneck, keys and values expanded per head from one ``kv_lora_rank`` latent
    shared by all heads, plus one ``qk_rope_head_dim`` rotary key shared by all heads. A q/k head is
    ``qk_nope_head_dim + qk_rope_head_dim`` wide (the attention's head_dim), a v head ``v_head_dim``.
    ``rope_interleave``: the rotary dims rotate in adjacent pairs (DeepSeek's layout)."""

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: Optional[int] = None  # None: q projected from the hidden state directly (V2-Lite)
    rope_interleave: bool = True

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class Attention:
    heads: int
    kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    out_bias: bool = False  # bias on the output projection (GPT-style models)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    rope: Optional[Rope] = None  # None: no positional encoding (Nemotron-H attention layers)
    # Sliding window (Mistral, Qwen2): a query attends to itself and the window - 1 keys before it,
    # key j visible from query i when 0 <= i - j < window (transformers' sliding_window_overlay).
    window: Optional[int] = None
    # Attention layers (counted among the model's attention layers, from 0) that keep full causal
    # attention although the model has a window: Qwen2's bottom max_window_layers.
    full_layers: tuple[int, ...] = ()
    # Multi-head latent attention (kv_heads == heads, head_dim == latent.qk_head_dim); None: GQA.
    latent: Optional[LatentKV] = None

    def window_of(self, index: int) -> Optional[int]:
        """The window of the model's ``index``-th attention layer; None: full causal attention."""
        return None if index in self.full_layers else self.window

    def at(self, index: int) -> "Attention":
        """This block as the ``index``-th attention layer has it: its own window, nothing per-layer."""
        return replace(self, window=self.window_of(index), full_layers=())

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def v_dim(self) -> int:
        """Width of the values per token (MLA: one v head per query head, v_head_dim wide)."""
        return self.kv_heads * self.v_head_dim

    @property
    def out_dim(self) -> int:
        """Width of the attention core's output per token (o_proj's input)."""
        return self.heads * self.v_head_dim

    @property
    def v_head_dim(self) -> int:
        return self.head_dim if self.latent is None else self.latent.v_head_dim

    @property
    def rope_dim(self) -> int:
        """Width of a head's rotated part: all of it, or MLA's decoupled rotary dims."""
        return self.head_dim if self.latent is None else self.latent.qk_rope_head_dim


@dataclass(frozen=True)
class MLP:
    ffn: int
    activation: str = "swiglu"
    bias: bool = False

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS


@dataclass(frozen=True)
class MoE:
    experts: int
    top_k: int
    ffn: int
    activation: str = "swiglu"
    shared_ffn: int = 0  # 0: no shared expert
    shared_gate: bool = False  # Qwen2-MoE: sigmoid gate on the shared expert output
    router: Literal["softmax", "sigmoid"] = "softmax"
    pre_softmax: bool = False  # softmax over all experts before top-k (vs. over the chosen k)
    norm_topk: bool = True  # renormalise the chosen k probabilities to sum to one
    expert_bias: bool = False  # aux-loss-free load balancing bias (selection only)
    groups: int = 1  # group-limited routing: experts split in groups ...
    topk_groups: int = 1  # ... of which the best topk_groups are eligible
    scaling_factor: float = 1.0
    aux_loss: float = 0.0
    z_loss: float = 0.0
    # A group's score sums its best group_top choice scores; 0: top_k // topk_groups (Megatron-Core).
    # transformers' DeepSeek-V3 router always sums the best 2.
    group_top: int = 0

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def group_score_top(self) -> int:
        return self.group_top or self.top_k // self.topk_groups


@dataclass(frozen=True)
class Mamba2:
    heads: int
    head_dim: int
    groups: int
    state: int
    conv: int = 4
    chunk: int = 128
    conv_bias: bool = True
    proj_bias: bool = False
    # The forward clamps dt = softplus(dt + dt_bias) from below at dt_min (transformers' Nemotron-H
    # and mamba-ssm: time_step_limit / dt_limit = (dt_min, inf)); 0 means no floor, their default.
    dt_min: float = 0.0

    @property
    def d_inner(self) -> int:
        return self.heads * self.head_dim

    @property
    def conv_channels(self) -> int:
        """Channels through the depthwise conv: x, B and C."""
        return self.d_inner + 2 * self.groups * self.state

    @property
    def in_proj_out(self) -> int:
        """Width of in_proj's output: [z, x, B, C, dt]."""
        return 2 * self.d_inner + 2 * self.groups * self.state + self.heads


Block = Union[Attention, MLP, MoE, Mamba2]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    vocab: int
    hidden: int
    layers: tuple[str, ...]  # one block kind per layer, each pre-norm + residual
    norm: Norm = field(default_factory=Norm)
    tie_embeddings: bool = False
    max_seq: Optional[int] = None
    learned_positions: bool = False  # GPT-style absolute position embeddings (max_seq x hidden)
    attention: Optional[Attention] = None
    mlp: Optional[MLP] = None
    moe: Optional[MoE] = None
    mamba: Optional[Mamba2] = None

    def block(self, kind: str) -> Block:
        spec = getattr(self, kind, None) if kind in BLOCK_KINDS else None
        if spec is None:
            raise KeyError(f"model {self.name!r} has no {kind!r} block")
        return spec

    def layer_block(self, layer: int) -> Block:
        """The block of layer ``layer`` with what may vary between layers of one kind resolved (an
        attention layer's window): a block with an ``at(index)`` gets the layer's index among the
        layers of its kind."""
        kind = self.layers[layer]
        block = self.block(kind)
        at = getattr(block, "at", None)
        return block if at is None else at(self.layers[:layer].count(kind))

    def count(self, kind: str) -> int:
        return sum(1 for k in self.layers if k == kind)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def pattern(self) -> str:
        """The layer sequence as a Megatron hybrid pattern string."""
        inverse = {v: k for k, v in PATTERN_SYMBOLS.items()}
        return "".join(inverse[k] for k in self.layers)

    @property
    def decoder_layers(self) -> Optional[int]:
        """Decoder layers as Hugging Face and Megatron's GPT model count them, when the layers are
        such pairs (attention, then mlp or moe: each kind where its hf facet's DECODER_SLOT puts
        it); None otherwise (hybrid models, where every block is a layer)."""
        slot = {k: kinds.facet(k, "hf").DECODER_SLOT for k in set(self.layers)}
        n = len(self.layers)
        pairs = n % 2 == 0 and all(slot[k] == i % 2 for i, k in enumerate(self.layers))
        return n // 2 if pairs else None

    @property
    def is_moe(self) -> bool:
        """Some layer holds routed experts (the expert-parallel side: ep, etp, edp)."""
        return any(kinds.facet(k, "counts").EXPERTS for k in set(self.layers))

    @property
    def is_hybrid(self) -> bool:
        """Some layer's kind is written only in a Megatron hybrid pattern (Mamba)."""
        return any(kinds.facet(k, "dsl").HYBRID for k in set(self.layers))
