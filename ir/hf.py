"""Hugging Face ``config.json`` -> ModelSpec.

Every key of the config is accounted for: mapped onto the IR, checked to hold a value plait can
represent, or listed as not affecting the architecture (token ids, dtype, init ranges, generation
and caching knobs). Anything else is a PlaitError naming the key and its value: a field that
changes the model is never silently dropped.

Supported ``model_type``: llama, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe, nemotron_h,
deepseek_v3.
Both the legacy (``rope_theta`` + ``rope_scaling``, ``hybrid_override_pattern``) and the
transformers 5 spellings (``rope_parameters``, ``layers_block_type``) are read.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

from . import kinds
from .errors import PlaitError
from .model import MLP, Attention, ModelSpec, MoE, Norm, Rope, RopeScaling

# Keys of a config (or of PretrainedConfig.to_dict()) that do not change the trained function:
# bookkeeping, token ids, dtype, weight init, generation, output and caching switches.
NON_ARCHITECTURAL = frozenset("""
    architectures transformers_version torch_dtype dtype _name_or_path name_or_path auto_map
    bos_token_id eos_token_id pad_token_id sep_token_id decoder_start_token_id
    forced_bos_token_id forced_eos_token_id use_cache initializer_range output_router_logits
    output_attentions output_hidden_states return_dict return_dict_in_generate output_scores
    id2label label2id problem_type finetuning_task task_specific_params tokenizer_class prefix
    chunk_size_feed_forward is_encoder_decoder is_decoder add_cross_attention
    cross_attention_hidden_size tie_encoder_decoder pruned_heads torchscript use_bfloat16
    tf_legacy_loss max_length min_length do_sample early_stopping num_beams num_beam_groups
    diversity_penalty temperature top_k top_p typical_p repetition_penalty length_penalty
    no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids num_return_sequences
    remove_invalid_values exponential_decay_length_penalty suppress_tokens begin_suppress_tokens
    pretraining_tp
""".split())  # pretraining_tp only slices the same matmuls differently

SUPPORTED_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
                   "nemotron_h", "deepseek_v3")
LLAMA_LIKE_TYPES = SUPPORTED_TYPES[:7]


# Defaults of transformers' config classes (5.x) that differ from the generic fallbacks used
# below; applied when a config.json omits the key (tests/ir/test_hf_import_defaults.py checks them).
TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": {"rope_theta": 1e6, "rms_norm_eps": 1e-5},
    "mistral": {"sliding_window": 4096},
    "deepseek_v3": {"q_lora_rank": 1536, "first_k_dense_replace": 3, "n_shared_experts": 1,
                    "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5},
}


class HFConfig:
    """A config dict whose keys are ticked off as they are read; `check_all_read` turns any key
    left over into an error. Values that are null count as absent."""

    def __init__(self, cfg: dict):
        # A key the file omits takes the default of transformers' config class for that type.
        self.cfg = {**TYPE_DEFAULTS.get(str(cfg.get("model_type", "")), {}), **cfg}
        self.model_type = str(cfg.get("model_type", ""))
        self.read: set[str] = {"model_type"}

    def has(self, key: str) -> bool:
        return self.cfg.get(key) is not None

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        value = self.cfg.get(key)
        return default if value is None else value

    def first(self, keys: tuple[str, ...], default: Any = None) -> Any:
        """The value of the first key present; every one of them must agree."""
        values = [(k, self.get(k)) for k in keys if self.has(k)]
        for key, value in values[1:]:
            if value != values[0][1]:
                raise self.error(key, value, f"it disagrees with {values[0][0]} = {values[0][1]!r}")
        return values[0][1] if values else default

    def required(self, key: str) -> Any:
        if not self.has(key):
            raise PlaitError(f"{self.model_type} config: missing required field {key!r}")
        return self.get(key)

    def expect(self, key: str, allowed: tuple, default: Any = None, why: str = "") -> Any:
        """Read a key whose value must be one of ``allowed`` (after applying the default)."""
        value = self.get(key, default)
        if value not in allowed:
            raise self.error(key, value, why or f"plait supports only {' / '.join(map(repr, allowed))}")
        return value

    def ignore(self, *keys: str) -> None:
        self.read.update(keys)

    def error(self, key: str, value: Any, hint: str) -> PlaitError:
        return PlaitError(f"{self.model_type} config: unsupported {key} = {value!r}", hint=hint)

    def check_all_read(self) -> None:
        unread = sorted(k for k, v in self.cfg.items()
                        if v is not None and k not in self.read and k not in NON_ARCHITECTURAL)
        if unread:
            shown = ", ".join(f"{k} = {self.cfg[k]!r}" for k in unread)
            raise PlaitError(
                f"{self.model_type} config: unknown field(s) {shown}",
                hint="plait cannot tell whether they change the architecture; remove them if not")


# ----------------------------------------------------------------------------------------------
# Pieces shared by the families
# ----------------------------------------------------------------------------------------------

def read_rope(c: HFConfig, allow_mscale: bool = False) -> Rope:
    """rope_parameters (transformers 5) or rope_theta + rope_scaling (legacy) -> Rope. YaRN's
    mscale / mscale_all_dim only where the family's attention reads them (``allow_mscale``)."""
    params = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", c.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", params.pop("type", "default"))
    partial = params.pop("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise c.error("partial_rotary_factor", partial, "plait rotates the full head dimension")
    if kind == "default":
        scaling = None
    elif kind == "linear":
        scaling = RopeScaling("linear", float(params.pop("factor")))
    elif kind == "llama3":
        scaling = RopeScaling(
            "llama3", float(params.pop("factor")),
            original_max_positions=int(params.pop("original_max_position_embeddings")),
            low_freq_factor=float(params.pop("low_freq_factor")),
            high_freq_factor=float(params.pop("high_freq_factor")))
    elif kind == "yarn":
        scaling = _read_yarn(c, params, allow_mscale)
    else:
        raise c.error("rope_type", kind, "plait supports default, linear, llama3 and yarn RoPE")
    if params:
        raise c.error("rope_parameters", params, f"unknown {kind} RoPE parameter(s)")
    return Rope(theta=theta, scaling=scaling)


def rope_fields(rope: Optional[Rope]) -> dict:
    """The inverse of `read_rope`: a Rope as transformers 5's ``rope_parameters``. YaRN's mscale
    pair is written when set (only a family whose attention reads it, DeepSeek-V3, reads it back)."""
    if rope is None:
        raise PlaitError("the model's attention has no RoPE; llama-family configs always rotate",
                         hint="export it as nemotron_h (attention without positions)")
    params = {"rope_type": "default", "rope_theta": rope.theta}
    s = rope.scaling
    if s is not None:
        params.update(rope_type=s.kind, factor=s.factor)
        if s.kind in ("yarn", "llama3"):
            params["original_max_position_embeddings"] = s.original_max_positions
        if s.kind == "yarn":
            params.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow)
            params.update({k: v for k, v in (("mscale", s.mscale), ("mscale_all_dim", s.mscale_all_dim))
                           if v is not None})
        if s.kind == "llama3":
            params.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
    return {"rope_parameters": params}


def _read_yarn(c: HFConfig, params: dict, allow_mscale: bool) -> RopeScaling:
    unsupported = ("attention_factor",) if allow_mscale else ("attention_factor", "mscale", "mscale_all_dim")
    for key in unsupported:
        if params.pop(key, None) is not None:
            raise c.error(f"rope_parameters.{key}", c.get("rope_parameters") or c.get("rope_scaling"),
                          "plait's yarn uses the default attention factor")
    mscale, mscale_all_dim = params.pop("mscale", None), params.pop("mscale_all_dim", None)
    if params.pop("truncate", True) is not True:
        raise c.error("rope_parameters.truncate", False, "plait's yarn truncates the correction range")
    original = params.pop("original_max_position_embeddings", None) or c.get("max_position_embeddings")
    return RopeScaling("yarn", float(params.pop("factor")), original_max_positions=int(original),
                       beta_fast=float(params.pop("beta_fast", 32.0)),
                       beta_slow=float(params.pop("beta_slow", 1.0)),
                       mscale=None if mscale is None else float(mscale),
                       mscale_all_dim=None if mscale_all_dim is None else float(mscale_all_dim))


def read_head_dim(c: HFConfig, keys: tuple[str, ...] = ("head_dim",)) -> int:
    hidden, heads = c.required("hidden_size"), c.required("num_attention_heads")
    return int(c.first(keys, hidden // heads))


def read_no_dropout(c: HFConfig, *keys: str) -> None:
    for key in keys:
        c.expect(key, (0, 0.0), 0.0, "plait trains without dropout")


def swiglu_activation(c: HFConfig, key: str = "hidden_act") -> str:
    c.expect(key, ("silu",), "silu", "plait's gated MLP is SwiGLU (silu gate)")
    return "swiglu"


def checked(c: HFConfig, spec: ModelSpec) -> ModelSpec:
    """Semantic checks the IR relies on, phrased in the config's own field names."""
    a = spec.attention
    if a is not None and a.heads % a.kv_heads:
        raise c.error("num_key_value_heads", a.kv_heads,
                      f"num_attention_heads ({a.heads}) must be divisible by it")
    if spec.moe is not None and not 0 < spec.moe.top_k <= spec.moe.experts:
        raise c.error("num_experts_per_tok", spec.moe.top_k,
                      f"must be between 1 and the number of experts ({spec.moe.experts})")
    if spec.mamba is not None and spec.mamba.heads % spec.mamba.groups:
        raise c.error("n_groups", spec.mamba.groups,
                      f"mamba_num_heads ({spec.mamba.heads}) must be divisible by it")
    c.check_all_read()
    return spec


# ----------------------------------------------------------------------------------------------
# Llama-like families: llama, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe
# ----------------------------------------------------------------------------------------------

def _attention(c: HFConfig, num_layers: int) -> Attention:
    t = c.model_type
    if t == "qwen2":
        qkv_bias, out_bias = True, False  # Qwen2 hard-codes q/k/v biases, none on o_proj
    elif t == "qwen2_moe":
        qkv_bias, out_bias = bool(c.get("qkv_bias", True)), False
    elif t in ("mistral", "mixtral"):
        qkv_bias = out_bias = False
    else:  # llama, qwen3, qwen3_moe: attention_bias puts biases on q, k, v and o
        qkv_bias = out_bias = bool(c.get("attention_bias", False))
    heads = int(c.required("num_attention_heads"))
    # every decoder layer has one attention layer; its windows are attention's config fields
    window, full_layers = kinds.facet("attention", "hf").read_window(c, num_layers)
    return Attention(
        heads=heads, kv_heads=int(c.get("num_key_value_heads", heads)), head_dim=read_head_dim(c),
        qkv_bias=qkv_bias, out_bias=out_bias, qk_norm=t in ("qwen3", "qwen3_moe"), rope=read_rope(c),
        window=window, full_layers=full_layers)


def _moe_layer_flags(c: HFConfig, num_layers: int) -> list[bool]:
    """Which decoder layers are MoE (transformers' rule for Qwen-MoE; all of them for Mixtral)."""
    if c.model_type == "mixtral":
        return [True] * num_layers
    step = int(c.get("decoder_sparse_step", 1))
    dense = set(c.get("mlp_only_layers", []))
    experts = int(c.first(("num_experts", "num_local_experts"), 0))
    return [i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(num_layers)]


def _moe(c: HFConfig) -> MoE:
    t = c.model_type
    aux = float(c.get("router_aux_loss_coef", 0.0))
    if t == "mixtral":
        c.expect("router_jitter_noise", (0, 0.0), 0.0, "plait's router has no jitter noise")
        return MoE(experts=int(c.required("num_local_experts")),
                   top_k=int(c.required("num_experts_per_tok")),
                   ffn=int(c.required("intermediate_size")), router="softmax",
                   pre_softmax=True, norm_topk=True, aux_loss=aux)
    shared = int(c.get("shared_expert_intermediate_size", 0)) if t == "qwen2_moe" else 0
    return MoE(experts=int(c.first(("num_experts", "num_local_experts"))),
               top_k=int(c.required("num_experts_per_tok")),
               ffn=int(c.required("moe_intermediate_size")),
               shared_ffn=shared, shared_gate=shared > 0, router="softmax", pre_softmax=True,
               norm_topk=bool(c.get("norm_topk_prob", False)), aux_loss=aux)


def llama_like(c: HFConfig, name: str) -> ModelSpec:
    read_no_dropout(c, "attention_dropout")
    activation = swiglu_activation(c)
    num_layers = int(c.required("num_hidden_layers"))
    moe_flags = (_moe_layer_flags(c, num_layers) if c.model_type in ("mixtral", "qwen2_moe",
                                                                       "qwen3_moe")
                 else [False] * num_layers)
    layers = tuple(k for is_moe in moe_flags for k in ("attention", "moe" if is_moe else "mlp"))
    mlp_bias = bool(c.get("mlp_bias", False)) if c.model_type == "llama" else False
    mlp = (MLP(ffn=int(c.required("intermediate_size")), activation=activation, bias=mlp_bias)
           if not all(moe_flags) else None)  # some decoder layer's feed-forward is dense
    c.ignore("intermediate_size")  # dense width, unused when every layer is MoE
    return checked(c, ModelSpec(
        name=name, vocab=int(c.required("vocab_size")), hidden=int(c.required("hidden_size")),
        layers=layers, norm=Norm("rmsnorm", float(c.get("rms_norm_eps", 1e-6))),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        max_seq=c.get("max_position_embeddings"), attention=_attention(c, num_layers), mlp=mlp,
        moe=_moe(c) if any(moe_flags) else None))


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------

def _builders() -> dict[str, Callable[[HFConfig, str], ModelSpec]]:
    from .hf_deepseek import deepseek_v3  # families with many fields of their own: own modules
    from .hf_nemotron import nemotron_h
    return {t: llama_like for t in LLAMA_LIKE_TYPES} | {"nemotron_h": nemotron_h, "deepseek_v3": deepseek_v3}


def default_name(cfg: dict) -> str:
    path = cfg.get("_name_or_path") or cfg.get("name_or_path")
    return os.path.basename(str(path).rstrip("/")).lower() if path else str(cfg.get("model_type"))


def model_from_hf_config(cfg: dict, name: Optional[str] = None) -> ModelSpec:
    """A transformers config (the config.json dict) as a plait ModelSpec."""
    if not isinstance(cfg, dict):
        raise PlaitError(f"a Hugging Face config must be a JSON object, got {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    builders = _builders()
    if model_type not in builders:
        raise PlaitError(f"unsupported Hugging Face model_type = {model_type!r}",
                         hint=f"plait imports {', '.join(SUPPORTED_TYPES)}")
    return builders[model_type](HFConfig(cfg), name or default_name(cfg))


MAX_CONFIG_BYTES = 16 << 20  # a config.json is a few KB


def hf_config_path(path: str) -> str:
    """The config.json a user means: the file itself, or the one in a model directory (as HF
    checkpoints are passed around)."""
    if os.path.isdir(path):
        inner = os.path.join(path, "config.json")
        if not os.path.isfile(inner):
            raise PlaitError(f"{path} is a directory without a config.json",
                             hint="pass a Hugging Face model directory or its config.json")
        return inner
    if not os.path.exists(path):
        raise PlaitError(f"no such file: {path}")
    if not os.path.isfile(path):
        raise PlaitError(f"{path} is not a regular file")
    return path


def load_hf_config(path: str) -> dict:
    """Read a config.json (Python's json accepts the Infinity some configs contain) from the file
    or model directory ``path``."""
    path = hf_config_path(path)
    with open(path, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise PlaitError(f"{path} is larger than {MAX_CONFIG_BYTES >> 20} MiB: not a config.json")
    try:
        config = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise PlaitError(f"{path} is not UTF-8 text (byte {e.start}): not a config.json") from None
    except json.JSONDecodeError as e:
        raise PlaitError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None
    if not isinstance(config, dict):
        raise PlaitError(f"{path} holds a JSON {type(config).__name__}, not a config object")
    return config


def import_notes(cfg: dict) -> list[str]:
    """What importing ``cfg`` leaves out on purpose (DeepSeek-V3's multi-token prediction), in
    words for `plait import` to print beside the spec."""
    if cfg.get("model_type") == "deepseek_v3":
        from .hf_deepseek import import_notes as deepseek_notes
        return deepseek_notes(cfg)
    return []


def model_from_hf_file(path: str, name: Optional[str] = None) -> ModelSpec:
    return model_from_hf_config(load_hf_config(path), name)
