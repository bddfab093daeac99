"""Nemotron-H (``model_type = nemotron_h``) config -> ModelSpec: a hybrid of Mamba2, attention,
squared-ReLU MLP and (Nemotron 3) sigmoid-routed MoE layers, one block per layer."""
from __future__ import annotations

from . import kinds
from .hf import HFConfig, checked, read_head_dim, read_no_dropout
from .model import MLP, PATTERN_SYMBOLS, Attention, Block, Mamba2, ModelSpec, MoE, Norm

# transformers' layers_block_type names (and the legacy ones it still accepts) -> plait kinds.
BLOCK_TYPES = {"linear_attention": "mamba", "mamba": "mamba", "full_attention": "attention",
               "attention": "attention", "mlp": "mlp", "moe": "moe"}

# Read, but they do not change the trained function: weight init (the dt range time_step_min /
# max / floor, residual rescale), inference caches and kernels, and Mamba1's dt rank.
# transformers ignores `expand` (the inner width is mamba_num_heads * mamba_head_dim) and
# `mamba_proj_bias` (use_bias sets the Mamba projections' biases), and so does plait.
_IGNORED = ("time_step_min", "time_step_max", "time_step_floor",
            "time_step_rank", "rescale_prenorm_residual", "residual_in_fp32", "use_mamba_kernels",
            "mamba_ssm_cache_dtype", "num_logits_to_keep", "expand", "moe_shared_expert_overlap",
            "mtp_layers_block_type", "mtp_hybrid_override_pattern", "mamba_proj_bias")


def read_layers(c: HFConfig) -> tuple[str, ...]:
    """hybrid_override_pattern (M mamba, * attention, - mlp, E moe) or layers_block_type."""
    if c.has("hybrid_override_pattern"):
        pattern = c.get("hybrid_override_pattern")
        unknown = sorted(set(pattern) - set(PATTERN_SYMBOLS))
        if unknown:
            raise c.error("hybrid_override_pattern", pattern,
                          f"unknown symbol(s) {' '.join(unknown)}; plait knows {' '.join(PATTERN_SYMBOLS)}")
        layers = tuple(PATTERN_SYMBOLS[s] for s in pattern)
    else:
        names = c.required("layers_block_type")
        unknown = sorted(set(names) - set(BLOCK_TYPES))
        if unknown:
            raise c.error("layers_block_type", unknown, f"plait knows {', '.join(BLOCK_TYPES)}")
        layers = tuple(BLOCK_TYPES[n] for n in names)
    declared = c.get("num_hidden_layers", len(layers))
    if declared != len(layers):
        raise c.error("num_hidden_layers", declared,
                      f"the layer pattern has {len(layers)} layers")
    return layers


def _attention(c: HFConfig, activation: str) -> Attention:
    # transformers' Nemotron-H attention has no biases and no position encoding at all.
    c.expect("attention_bias", (False,), False, "Nemotron-H attention has no biases")
    c.expect("sliding_window", (None,), None, "plait has no sliding-window attention")
    heads = int(c.required("num_attention_heads"))
    return Attention(heads=heads, kv_heads=int(c.get("num_key_value_heads", heads)),
                     head_dim=read_head_dim(c, ("head_dim", "attention_head_dim")), rope=None)


def _mamba(c: HFConfig, activation: str) -> Mamba2:
    c.expect("mamba_hidden_act", ("silu",), "silu", "plait's Mamba2 gates with silu")
    return Mamba2(heads=int(c.required("mamba_num_heads")), head_dim=int(c.required("mamba_head_dim")),
                  groups=int(c.first(("n_groups", "mamba_n_groups"), 8)),
                  state=int(c.required("ssm_state_size")),
                  conv=int(c.first(("conv_kernel", "mamba_d_conv"), 4)),
                  chunk=int(c.first(("chunk_size", "mamba_chunk_size"), 128)),
                  conv_bias=bool(c.first(("use_conv_bias", "mamba_conv_bias"), True)),
                  proj_bias=bool(c.get("use_bias", False)),
                  dt_min=_dt_floor(c))


def _dt_floor(c: HFConfig) -> float:
    """The floor the forward clamps dt at: time_step_limit's low end (transformers >= 5.25, as
    mamba-ssm's dt_limit; default (0, inf): no floor; the published Nemotron-H configs say so).
    Older transformers clamped at time_step_min, an initialisation bound, instead. plait's mixer
    has no ceiling, so the high end must be infinite."""
    limit = c.get("time_step_limit", (0.0, float("inf")))
    if not isinstance(limit, (list, tuple)) or len(limit) != 2:
        raise c.error("time_step_limit", limit, "expected [low, high], the dt clamp's bounds")
    low, high = (_number(v) for v in limit)
    if high != float("inf"):
        raise c.error("time_step_limit", [low, high], "plait's Mamba2 floors dt but has no ceiling")
    return low


def _number(value) -> float:
    """A JSON number; transformers >= 5.25 writes infinity as {"__float__": "Infinity"}."""
    return float(value["__float__"] if isinstance(value, dict) and "__float__" in value else value)


def _mlp(c: HFConfig, activation: str) -> MLP:
    return MLP(int(c.required("intermediate_size")), activation, bool(c.get("mlp_bias", False)))


def _moe(c: HFConfig, activation: str) -> MoE:
    """Sigmoid router with an aux-loss-free expert bias, group-limited top-k, relu2 experts and
    one always-on shared expert (transformers builds exactly one, of the shared width)."""
    if c.get("moe_latent_size") is not None:
        raise c.error("moe_latent_size", c.get("moe_latent_size"), "plait's experts run at hidden width")
    c.expect("n_shared_experts", (1,), 1, "transformers' Nemotron-H builds exactly one shared expert")
    if c.get("mlp_bias", False):
        raise c.error("mlp_bias", True, "plait's MoE experts have no biases")
    return MoE(experts=int(c.first(("n_routed_experts", "num_local_experts"))),
               top_k=int(c.required("num_experts_per_tok")),
               ffn=int(c.required("moe_intermediate_size")), activation=activation,
               shared_ffn=int(c.required("moe_shared_expert_intermediate_size")),
               router="sigmoid", norm_topk=bool(c.get("norm_topk_prob", True)), expert_bias=True,
               groups=int(c.get("n_group", 1)), topk_groups=int(c.get("topk_group", 1)),
               scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
               aux_loss=float(c.get("router_aux_loss_coef", 0.0)))


def _norm(c: HFConfig) -> Norm:
    return Norm("rmsnorm", float(c.first(("layer_norm_epsilon", "rms_norm_eps"), 1e-5)))


def _untied(c: HFConfig) -> bool:
    c.expect("tie_word_embeddings", (False,), False,
             "transformers' Nemotron-H never ties its output layer to the embedding")
    return False


def nemotron_h(c: HFConfig, name: str) -> ModelSpec:
    c.ignore(*_IGNORED)
    read_no_dropout(c, "attention_dropout", "hidden_dropout")
    mtp = c.get("num_nextn_predict_layers", 0)
    if mtp:
        raise c.error("num_nextn_predict_layers", mtp, "plait has no multi-token-prediction layers")
    layers = read_layers(c)
    activation = c.expect("mlp_hidden_act", ("relu2",), "relu2", "Nemotron-H MLPs are squared ReLU")
    spec = ModelSpec(
        name=name, vocab=int(c.required("vocab_size")), hidden=int(c.required("hidden_size")),
        layers=layers, norm=_norm(c), tie_embeddings=_untied(c),
        max_seq=c.get("max_position_embeddings"),
        **{kind: _read_block(c, kind, activation) if kind in layers else None for kind in kinds.names()})
    _ignore_unused_blocks(c, layers)
    return checked(c, spec)


# The family's config -> each kind's block, and the fields of each (transformers fills in defaults
# for the kinds a pattern never uses, which are then ignored).
_BLOCK_READERS = {"attention": _attention, "mlp": _mlp, "moe": _moe, "mamba": _mamba}
_BLOCK_FIELDS = {
    "attention": ("num_attention_heads", "num_key_value_heads", "head_dim", "attention_head_dim",
                  "attention_bias", "sliding_window"),
    "mlp": ("intermediate_size", "mlp_bias"),
    "moe": ("n_routed_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
            "moe_shared_expert_intermediate_size", "n_shared_experts", "norm_topk_prob", "n_group",
            "topk_group", "routed_scaling_factor", "moe_latent_size", "router_aux_loss_coef"),
    "mamba": ("mamba_num_heads", "mamba_head_dim", "n_groups", "mamba_n_groups", "ssm_state_size",
              "conv_kernel", "mamba_d_conv", "chunk_size", "mamba_chunk_size", "use_conv_bias",
              "mamba_conv_bias", "use_bias", "mamba_hidden_act", "time_step_limit"),
}


def _read_block(c: HFConfig, kind: str, activation: str) -> Block:
    if kind not in _BLOCK_READERS:
        raise c.error("hybrid_override_pattern", c.get("hybrid_override_pattern"),
                      f"Nemotron-H has no {kind} layers")
    return _BLOCK_READERS[kind](c, activation)


def _ignore_unused_blocks(c: HFConfig, layers: tuple[str, ...]) -> None:
    """Fields of block kinds the pattern never uses carry transformers' defaults: ignore them."""
    for kind, keys in _BLOCK_FIELDS.items():
        if kind not in layers:
            c.ignore(*keys)
