"""ModelSpec -> Hugging Face ``config.json`` (the inverse of ir/hf.py), for `plait export hf`.

The family is named by the user or inferred from the spec's features. Whatever is written is read
back through `model_from_hf_config` and must give the same spec (up to its name): a model a family
cannot express (say, qkv biases in Mixtral) is a PlaitError naming the field, never a config that
silently builds another model.
"""
from __future__ import annotations

import json
from dataclasses import replace
from typing import Optional

from . import kinds
from .errors import PlaitError
from .hf import SUPPORTED_TYPES, model_from_hf_config, rope_fields
from .hf_deepseek import deepseek_v3_fields
from .model import ModelSpec
from .serde import to_dict

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "nemotron_h": "NemotronHForCausalLM",
                 "deepseek_v3": "DeepseekV3ForCausalLM"}
DEFAULT_MAX_POSITIONS = 4096  # written when the spec leaves max_seq open (no effect without yarn)


def infer_family(spec: ModelSpec) -> str:
    """The Hugging Face model_type whose architecture matches the spec's features."""
    a = spec.attention
    hybrid = spec.is_hybrid or kinds.facet(spec.layers[0], "hf").DECODER_SLOT != 0  # no decoder pairs
    if a is not None and a.latent is not None:  # only DeepSeek's checkpoints hold latent attention
        if hybrid:
            raise PlaitError(f"model {spec.name!r} has multi-head latent attention outside "
                             "[attention, mlp|moe] decoder layers (pattern "
                             f"{spec.pattern!r}): no Hugging Face family holds it",
                             hint="deepseek_v3 holds latent attention in decoder layers; nemotron_h "
                                  "holds hybrids, without latent attention")
        return "deepseek_v3"
    if hybrid:
        return "nemotron_h"
    if spec.moe is not None:
        if spec.moe.router == "sigmoid" or spec.moe.expert_bias:
            raise PlaitError(f"model {spec.name!r} routes its experts by sigmoid scores / expert bias "
                             "under plain attention: no Hugging Face family holds that",
                             hint="deepseek_v3 routes so under latent attention, nemotron_h in "
                                  "hybrids; mixtral and qwen*_moe route by softmax")
        if spec.moe.shared_ffn:
            return "qwen2_moe"
        return "qwen3_moe" if a.qk_norm else "mixtral"
    if a.qk_norm:
        return "qwen3"
    if a.qkv_bias and not a.out_bias:
        return "qwen2"
    return "llama" if a.window is None else "mistral"  # a window in a plain llama layout: Mistral


def _llama_like(spec: ModelSpec, family: str) -> dict:
    a, decoders = spec.attention, spec.num_layers // 2
    cfg = {"num_hidden_layers": decoders, "num_attention_heads": a.heads,
           "num_key_value_heads": a.kv_heads, "head_dim": a.head_dim, "hidden_act": "silu",
           "rms_norm_eps": spec.norm.eps, "attention_dropout": 0.0, **rope_fields(a.rope)}
    if family in ("llama", "qwen3", "qwen3_moe"):
        cfg["attention_bias"] = a.qkv_bias
    if family == "qwen2_moe":
        cfg["qkv_bias"] = a.qkv_bias
    if family == "llama":
        cfg["mlp_bias"] = spec.mlp.bias if spec.mlp else False
    cfg.update(kinds.facet("attention", "hf").window_fields(spec, family))  # attention's windows
    if spec.mlp is not None:
        cfg["intermediate_size"] = spec.mlp.ffn
    if spec.moe is not None:
        cfg.update(_llama_moe(spec, family))
    return cfg


def _llama_moe(spec: ModelSpec, family: str) -> dict:
    m = spec.moe
    common = {"num_experts_per_tok": m.top_k, "router_aux_loss_coef": m.aux_loss}
    if family == "mixtral":
        return {**common, "num_local_experts": m.experts, "intermediate_size": m.ffn,
                "router_jitter_noise": 0.0}
    # decoder layers whose feed-forward is dense (no routed experts)
    dense = [i // 2 for i in range(1, spec.num_layers, 2)
             if not kinds.facet(spec.layers[i], "counts").EXPERTS]
    out = {**common, "num_experts": m.experts, "moe_intermediate_size": m.ffn,
           "norm_topk_prob": m.norm_topk, "decoder_sparse_step": 1, "mlp_only_layers": dense}
    if family == "qwen2_moe":
        out["shared_expert_intermediate_size"] = m.shared_ffn
    return out


def _nemotron_h(spec: ModelSpec) -> dict:
    cfg = {"hybrid_override_pattern": spec.pattern, "num_hidden_layers": spec.num_layers,
           "layer_norm_epsilon": spec.norm.eps, "attention_dropout": 0.0, "hidden_dropout": 0.0}
    for kind in kinds.names():  # each block the model has describes itself (its hf facet)
        if getattr(spec, kind) is not None:
            cfg.update(kinds.facet(kind, "hf").nemotron_h_fields(spec))
    return cfg


def _family_fields(spec: ModelSpec, family: str) -> dict:
    """The config fields of ``family`` (all but those every family shares). DeepSeek-V3 writes its
    own beside its import (ir/hf_deepseek.py); Nemotron-H's come from its blocks' hf facets."""
    own = {"nemotron_h": _nemotron_h, "deepseek_v3": deepseek_v3_fields}
    return own[family](spec) if family in own else _llama_like(spec, family)


def hf_config(spec: ModelSpec, family: Optional[str] = None, dtype: str = "bfloat16") -> dict:
    """The config.json of ``spec`` as ``family`` (default: inferred), checked by reading it back."""
    family = family or infer_family(spec)
    if family not in SUPPORTED_TYPES:
        raise PlaitError(f"cannot export to model_type {family!r}",
                         hint=f"plait exports {', '.join(SUPPORTED_TYPES)}")
    body = _family_fields(spec, family)
    cfg = {"model_type": family, "architectures": [ARCHITECTURES[family]],
           "vocab_size": spec.vocab, "hidden_size": spec.hidden,
           "tie_word_embeddings": spec.tie_embeddings,
           "max_position_embeddings": spec.max_seq or DEFAULT_MAX_POSITIONS, **body, "dtype": dtype}
    _check_round_trip(spec, cfg, family)
    return cfg


def _check_round_trip(spec: ModelSpec, cfg: dict, family: str) -> None:
    try:
        back = model_from_hf_config(json.loads(json.dumps(cfg)), spec.name)
    except PlaitError as e:
        raise PlaitError(f"model {spec.name!r} cannot be written as a {family} config: {e.message}",
                         hint="pass another --family, or check the model spec") from None
    want = spec if spec.max_seq else replace(spec, max_seq=cfg["max_position_embeddings"])
    got, want = to_dict(back), to_dict(want)
    for key in want:
        if got.get(key) != want[key]:
            raise PlaitError(f"model {spec.name!r} cannot be written as a {family} config: its "
                             f"{key} would read back as {got.get(key)!r}, not {want[key]!r}",
                             hint="pass another --family (plait export hf --family)")
