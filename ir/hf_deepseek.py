"""DeepSeek-V3 (``model_type = deepseek_v3``) config -> ModelSpec, as transformers (5.x) builds
``DeepseekV3ForCausalLM``: multi-head latent attention (Attention.latent) in every decoder layer;
the first ``first_k_dense_replace`` layers have a dense SwiGLU MLP, the rest a sigmoid-routed MoE
with the aux-loss-free expert bias, group-limited top-k (a group scores the sum of its best 2
experts), ``n_shared_experts`` shared experts of ``moe_intermediate_size`` each, and the routed
scaling factor.

Multi-token prediction (``num_nextn_predict_layers``, the extra layer 61 of the public checkpoint)
is not part of transformers' model and is left out here too: the import is the 61-layer main model.

`deepseek_v3_fields` is the way back (`plait export hf`, through ir/hf_write.py): the config fields
of a spec, refusing with the feature's name what DeepSeek-V3's architecture cannot say.
"""
from __future__ import annotations

from . import kinds
from .errors import PlaitError
from .hf import HFConfig, checked, read_no_dropout, read_rope, rope_fields, swiglu_activation
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
               groups=groups, topk_groups=int(c.get("topk_group", 1)), group_top=_group_top(groups),
               scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
               # not a DeepSeek field: plait's batch-wise balancing loss, carried by plait's exports
               aux_loss=float(c.get("router_aux_loss_coef", 0.0)))


def _group_top(groups: int) -> int:
    """transformers' group score sums a group's best 2 experts (no groups: nothing to score)."""
    return 2 if groups > 1 else 0


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


# ---- export: ModelSpec -> config.json fields ------------------------------------------------------

def deepseek_v3_fields(spec: ModelSpec) -> dict:
    """The DeepSeek-V3 config fields of ``spec`` (all but the ones every family shares)."""
    a = spec.attention
    if a is None or a.latent is None:
        raise PlaitError(f"model {spec.name!r} has no multi-head latent attention; every DeepSeek-V3 "
                         "layer has it", hint="export it as another family (plait export hf --family)")
    lat = a.latent
    if a.qkv_bias or a.out_bias or a.qk_norm or a.window is not None or a.rope is None:
        raise PlaitError(f"model {spec.name!r}: DeepSeek-V3's latent attention has no projection biases, "
                         "q/k norms or sliding window, and rotates its qk_rope_head_dim dims (RoPE)")
    cfg = {"num_hidden_layers": spec.num_layers // 2, "num_attention_heads": a.heads,
           "num_key_value_heads": a.heads, "q_lora_rank": lat.q_lora_rank, "kv_lora_rank": lat.kv_lora_rank,
           "qk_nope_head_dim": lat.qk_nope_head_dim, "qk_rope_head_dim": lat.qk_rope_head_dim,
           "v_head_dim": lat.v_head_dim, "rope_interleave": lat.rope_interleave, **rope_fields(a.rope),
           "attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu",
           "rms_norm_eps": spec.norm.eps, "first_k_dense_replace": _dense_decoders(spec),
           "num_nextn_predict_layers": 0}  # plait trains no multi-token-prediction layer
    if spec.mlp is not None:
        cfg["intermediate_size"] = spec.mlp.ffn
    if spec.moe is not None:
        cfg.update(_moe_fields(spec))
    return cfg


def _dense_decoders(spec: ModelSpec) -> int:
    """first_k_dense_replace: DeepSeek-V3's dense feed-forwards come first, then only MoE."""
    dense = [not kinds.facet(k, "counts").EXPERTS for k in spec.layers[1::2]]
    first_k = dense.index(False) if False in dense else len(dense)
    if any(dense[first_k:]):
        raise PlaitError(f"model {spec.name!r}: decoder layer {dense.index(True, first_k)} has a dense "
                         f"feed-forward after MoE ones; DeepSeek-V3 has only its first "
                         "first_k_dense_replace layers dense", hint=f"model pattern is {spec.pattern!r}")
    return first_k


def _moe_fields(spec: ModelSpec) -> dict:
    m = spec.moe
    if m.router != "sigmoid" or not m.expert_bias or m.shared_gate:
        raise PlaitError(f"model {spec.name!r}: DeepSeek-V3's MoE routes by sigmoid scores with the "
                         "expert bias (e_score_correction_bias) and has no shared-expert gate",
                         hint="moe { router = sigmoid, expert_bias = true } without shared_gate")
    if m.shared_ffn % m.ffn or not m.shared_ffn:
        raise PlaitError(f"model {spec.name!r}: DeepSeek-V3's shared experts are n_shared_experts >= 1 "
                         f"experts of moe_intermediate_size ({m.ffn}); shared_ffn is {m.shared_ffn}")
    if m.group_top != _group_top(m.groups):
        same = m.groups > 1 and m.group_score_top == 2  # Megatron's top_k // topk_groups happens to be 2
        raise PlaitError(f"model {spec.name!r}: DeepSeek-V3 scores a group by its best 2 experts "
                         f"(group_top = 2, or 0 without groups); this model's group_top is {m.group_top}"
                         + (" (top_k // topk_groups = 2: the same routing)" if same else ""),
                         hint=f"moe {{ group_top = {_group_top(m.groups)} }}" if same or m.groups == 1 else None)
    out = {"n_routed_experts": m.experts, "num_experts_per_tok": m.top_k, "moe_intermediate_size": m.ffn,
           "n_shared_experts": m.shared_ffn // m.ffn, "n_group": m.groups, "topk_group": m.topk_groups,
           "norm_topk_prob": m.norm_topk, "routed_scaling_factor": m.scaling_factor}
    if m.aux_loss:
        out["router_aux_loss_coef"] = m.aux_loss
    return out
