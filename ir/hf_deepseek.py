"""DeepSeek-V3 (``model_type = deepseek_v3``) config -> ModelSpec, as transformers (5.x) builds
``DeepseekV3ForCausalLM``: multi-head latent attention (Attention.latent) in every decoder layer;
the first ``first_k_dense_replace`` layers have a dense SwiGLU MLP, the rest a sigmoid-routed MoE
with the aux-loss-free expert bias, group-limited top-k (a group scores the sum of its best 2
experts), ``n_shared_experts`` shared experts of ``moe_intermediate_size`` each, and the routed
scaling factor.

Multi-token prediction (``num_nextn_predict_layers``, the extra layer 61 of the public checkpoint)
is not part of transformers' model and is left out here too: the import is the 61-layer main model.
"""
from __future__ import annotations

from .hf import HFConfig, checked, read_no_dropout, read_rope, swiglu_activation
from .model import MLP, Attention, LatentKV, ModelSpec, MoE, Norm

# In DeepSeek's own config.json but read by neither transformers' model nor plait: the MTP depth
# (see above), the inference EP degree, the checkpoint's fp8 storage format (weights are read in
# the training precision), and DeepSeek's sequence-wise auxiliary loss (aux_loss_alpha, seq_aux;
# a training objective plait does not implement: set moe { aux_loss } in the spec to train with
# plait's batch-wise balancing loss instead of the default aux-loss-free bias alone).
_IGNORED = ("num_nextn_predict_layers", "ep_size", "quantization_config", "aux_loss_alpha", "seq_aux")


def import_notes(cfg: dict) -> list[str]:
    """What the import leaves out on purpose, in words."""
    mtp = cfg.get("num_nextn_predict_layers") or 0
    if not mtp:
        return []
    return [f"{mtp} multi-token-prediction layer(s) (num_nextn_predict_layers) not imported: "
            "transformers' DeepseekV3ForCausalLM has none; the count above is the main model"]


def _latent_attention(c: HFConfig) -> Attention:
    c.expect("attention_bias", (False,), False, "plait's latent attention has no projection biases")
    heads = int(c.required("num_attention_heads"))
    c.expect("num_key_value_heads", (heads, None), heads,
             "DeepSeek-V3 expands one key/value head per query head from the latent")
    latent = LatentKV(kv_lora_rank=int(c.required("kv_lora_rank")),
                      qk_nope_head_dim=int(c.required("qk_nope_head_dim")),
                      qk_rope_head_dim=int(c.required("qk_rope_head_dim")),
                      v_head_dim=int(c.required("v_head_dim")),
                      q_lora_rank=c.get("q_lora_rank"),
                      rope_interleave=bool(c.get("rope_interleave", True)))
    # transformers' config class derives these two; a saved config carries them
    c.expect("qk_head_dim", (latent.qk_head_dim,), latent.qk_head_dim, "qk_nope_head_dim + qk_rope_head_dim")
    c.expect("head_dim", (latent.qk_rope_head_dim,), latent.qk_rope_head_dim,
             "transformers sets head_dim to qk_rope_head_dim (the rotary width)")
    rope = read_rope(c, allow_mscale=True)
    return Attention(heads=heads, kv_heads=heads, head_dim=latent.qk_head_dim, rope=rope, latent=latent)


def _moe(c: HFConfig) -> MoE:
    c.expect("scoring_func", ("sigmoid",), "sigmoid", "transformers' DeepSeek-V3 router is sigmoid")
    c.expect("topk_method", ("noaux_tc",), "noaux_tc", "transformers' DeepSeek-V3 router is noaux_tc")
    c.expect("moe_layer_freq", (1,), 1, "every layer after the dense ones is MoE")
    experts, ffn = int(c.required("n_routed_experts")), int(c.required("moe_intermediate_size"))
    groups = int(c.get("n_group", 1))
    return MoE(experts=experts, top_k=int(c.required("num_experts_per_tok")), ffn=ffn,
               shared_ffn=ffn * int(c.get("n_shared_experts", 0)), router="sigmoid",
               norm_topk=bool(c.get("norm_topk_prob", True)), expert_bias=True,
               groups=groups, topk_groups=int(c.get("topk_group", 1)), group_top=2 if groups > 1 else 0,
               scaling_factor=float(c.get("routed_scaling_factor", 1.0)))


def deepseek_v3(c: HFConfig, name: str) -> ModelSpec:
    read_no_dropout(c, "attention_dropout")
    c.ignore(*_IGNORED)
    activation = swiglu_activation(c)
    num_layers = int(c.required("num_hidden_layers"))
    dense = min(int(c.get("first_k_dense_replace", 0)), num_layers)
    layers = ("attention", "mlp") * dense + ("attention", "moe") * (num_layers - dense)
    mlp = MLP(ffn=int(c.required("intermediate_size")), activation=activation) if dense else None
    c.ignore("intermediate_size")
    moe = _moe(c) if dense < num_layers else None
    if moe is None:
        c.ignore("n_routed_experts", "moe_intermediate_size", "num_experts_per_tok", "n_shared_experts",
                 "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor", "scoring_func",
                 "topk_method", "moe_layer_freq")
    spec = checked(c, ModelSpec(
        name=name, vocab=int(c.required("vocab_size")), hidden=int(c.required("hidden_size")),
        layers=layers, norm=Norm("rmsnorm", float(c.get("rms_norm_eps", 1e-6))),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        max_seq=c.get("max_position_embeddings"), attention=_latent_attention(c), mlp=mlp, moe=moe))
    _check_groups(c, spec.moe)
    return spec


def _check_groups(c: HFConfig, m: MoE | None) -> None:
    if m is None or m.groups == 1:
        return
    if m.experts % m.groups or m.experts // m.groups < 2:
        raise c.error("n_group", m.groups, f"n_routed_experts ({m.experts}) must split into groups of at "
                                           "least 2 (a group scores its best 2 experts)")
    if not m.topk_groups <= m.groups or m.top_k > m.topk_groups * (m.experts // m.groups):
        raise c.error("topk_group", m.topk_groups, f"the best topk_group groups must hold num_experts_per_tok "
                                                   f"({m.top_k}) experts")
