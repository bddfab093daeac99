"""Per model type: which checkpoint tensors make up each reference parameter (see weights.py).

Llama-family checkpoints hold one decoder layer per ``[attention, mlp|moe]`` pair of reference
layers (reference layer 2j is decoder j's attention, 2j+1 its feed-forward); Nemotron-H holds one
block per reference layer with the same mixer parameter names as the reference model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from plait.ir.errors import PlaitError
from plait.ir.model import ModelSpec

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")
HYBRID = ("nemotron_h",)
SUPPORTED = LLAMA_LIKE + HYBRID


@dataclass(frozen=True)
class Ref:
    name: str


@dataclass(frozen=True)
class Cat:
    dim: int
    parts: tuple


@dataclass(frozen=True)
class Stack:
    parts: tuple


Recipe = Union[Ref, Cat, Stack]


def refs(recipe: Recipe) -> list[str]:
    if isinstance(recipe, Ref):
        return [recipe.name]
    return [n for part in recipe.parts for n in refs(part)]


def hf_candidates(model_type: str, spec: ModelSpec, name: str) -> list:
    """Alternative recipes (first one whose tensors all exist wins) for reference param ``name``."""
    if model_type in LLAMA_LIKE:
        return _llama_like(spec, name)
    if model_type in HYBRID:
        return [r for prefix in ("model.", "backbone.") for r in _nemotron_h(spec, name, prefix)]
    raise PlaitError(f"no weight name mapping for model type {model_type!r}",
                     hint=f"supported: {', '.join(SUPPORTED)}")


def _split(name: str) -> tuple[int, str]:
    """'layers.3.mixer.q_proj.weight' -> (3, 'mixer.q_proj.weight')."""
    _, idx, rest = name.split(".", 2)
    return int(idx), rest


def _top_level(name: str, embed: str, final_norm: str) -> list | None:
    if name == "embed.weight":
        return [Ref(embed)]
    if name.startswith("final_norm."):
        return [Ref(final_norm + name.split(".", 1)[1])]
    if name == "head.weight":
        return [Ref("lm_head.weight")]
    return None


def _llama_like(spec: ModelSpec, name: str) -> list:
    top = _top_level(name, "model.embed_tokens.weight", "model.norm.")
    if top is not None:
        return top
    i, rest = _split(name)
    kind, decoder = spec.layers[i], i // 2
    if (i % 2 == 0) != (kind == "attention"):
        raise PlaitError(f"layer {i} ({kind}) does not fit the [attention, mlp|moe] decoder-layer pairs "
                         f"of a llama-family checkpoint", hint=f"model pattern is {spec.pattern!r}")
    p = f"model.layers.{decoder}."
    if rest.startswith("norm."):
        which = "input_layernorm." if kind == "attention" else "post_attention_layernorm."
        return [Ref(p + which + rest.split(".", 1)[1])]
    local = rest.split(".", 1)[1]  # drop 'mixer.'
    if kind == "attention":
        return [Ref(p + "self_attn." + local)]
    if kind == "mlp":
        return [Ref(p + "mlp." + local)]
    return _llama_moe(spec, p, local)


def _llama_moe(spec: ModelSpec, p: str, local: str) -> list:
    experts = range(spec.moe.experts)
    if local == "router.weight":
        return [Ref(p + "mlp.gate.weight"), Ref(p + "block_sparse_moe.gate.weight")]
    if local == "expert_bias":
        return [Ref(p + "mlp.gate.e_score_correction_bias")]
    if local == "experts.w_gate_up":
        per_expert = [(p + "mlp.experts.{}.gate_proj.weight", p + "mlp.experts.{}.up_proj.weight"),
                      (p + "block_sparse_moe.experts.{}.w1.weight", p + "block_sparse_moe.experts.{}.w3.weight")]
        if not spec.moe.gated:
            per_expert = [(p + "mlp.experts.{}.up_proj.weight",)]
        return [Ref(p + "mlp.experts.gate_up_proj"), Ref(p + "mlp.experts.up_proj")] + [
            Stack(tuple(Cat(0, tuple(Ref(f.format(e)) for f in fmt)) for e in experts)) for fmt in per_expert]
    if local == "experts.w_down":
        return [Ref(p + "mlp.experts.down_proj")] + [
            Stack(tuple(Ref(f.format(e)) for e in experts))
            for f in (p + "mlp.experts.{}.down_proj.weight", p + "block_sparse_moe.experts.{}.w2.weight")]
    if local.startswith("shared."):
        return [Ref(p + "mlp.shared_expert." + local.split(".", 1)[1]),
                Ref(p + "mlp.shared_experts." + local.split(".", 1)[1])]  # DeepSeek-V3
    if local.startswith("shared_gate."):
        return [Ref(p + "mlp.shared_expert_gate." + local.split(".", 1)[1])]
    raise PlaitError(f"no checkpoint name for MoE parameter {local!r}")


def _nemotron_h(spec: ModelSpec, name: str, prefix: str) -> list:
    top = _top_level(name, prefix + "embeddings.weight", prefix + "norm_f.")
    if top is not None:
        return top
    i, rest = _split(name)
    p = f"{prefix}layers.{i}."
    if spec.layers[i] != "moe" or rest.startswith("norm."):
        return [Ref(p + rest)]
    local = rest.split(".", 1)[1]
    m = p + "mixer."
    experts = range(spec.moe.experts)
    table = {
        "router.weight": [Ref(m + "gate.weight")],
        "expert_bias": [Ref(m + "gate.e_score_correction_bias")],
        "experts.w_gate_up": [Ref(m + "experts.up_proj"),
                              Stack(tuple(Ref(f"{m}experts.{e}.up_proj.weight") for e in experts))],
        "experts.w_down": [Ref(m + "experts.down_proj"),
                           Stack(tuple(Ref(f"{m}experts.{e}.down_proj.weight") for e in experts))],
    }
    if local.startswith("shared."):
        return [Ref(m + "shared_experts." + local.split(".", 1)[1])]
    if local not in table:
        raise PlaitError(f"no checkpoint name for MoE parameter {local!r}")
    return table[local]


# ---- export: reference tensors -> the checkpoint names a family's hub checkpoints use ------------
def _hub_fits(model_type: str, names: list[str]) -> bool:
    """Names in the layout transformers' save_pretrained writes for this family: Mixtral's
    block_sparse_moe experts w1/w2/w3, Qwen-MoE's mlp.experts.{e}, Nemotron-H's backbone prefix."""
    if model_type == "mixtral":
        return not any(".mlp." in n for n in names)
    if model_type in ("qwen2_moe", "qwen3_moe"):
        return not any("block_sparse_moe" in n for n in names)
    if model_type in HYBRID:
        return all(n.startswith("backbone.") or n == "lm_head.weight" for n in names)
    return True


def export_recipe(model_type: str, spec: ModelSpec, name: str) -> Recipe:
    """The recipe to write reference tensor ``name`` as: the family's hub layout (per-expert
    tensors rather than transformers' in-memory fused ones), which from_pretrained reads."""
    candidates = [r for r in hf_candidates(model_type, spec, name) if _hub_fits(model_type, refs(r))]
    if not candidates:
        raise PlaitError(f"no {model_type} checkpoint name for {name!r}")
    stacks = [r for r in candidates if isinstance(r, Stack)]
    return (stacks or candidates)[0]


def split_recipe(recipe: Recipe, tensor) -> dict:
    """The checkpoint tensors that make up ``tensor`` under ``recipe`` (the inverse of reading it):
    a Stack unbinds dim 0, a Cat splits into equal parts (gate and up rows)."""
    if isinstance(recipe, Ref):
        return {recipe.name: tensor}
    if isinstance(recipe, Stack):
        pieces = tensor.unbind(0)
    else:
        if tensor.shape[recipe.dim] % len(recipe.parts):
            raise PlaitError(f"cannot split {tuple(tensor.shape)} into {len(recipe.parts)} equal "
                             f"parts along dim {recipe.dim}")
        pieces = tensor.chunk(len(recipe.parts), recipe.dim)
    out = {}
    for part, piece in zip(recipe.parts, pieces):
        out.update(split_recipe(part, piece))
    return out
