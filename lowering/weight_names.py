"""Per model type: which checkpoint tensors make up each reference parameter (see weights.py).

Llama-family checkpoints hold one decoder layer per ``[attention, mlp|moe]`` pair of reference
layers (reference layer 2j is decoder j's attention, 2j+1 its feed-forward); Nemotron-H holds one
block per reference layer with the same mixer parameter names as the reference model (but MoE's).
The family's layout (prefixes, decoder pairs, top-level tensors) is here; each block kind's names
inside a layer come from its hf facet (plait/kinds/<kind>/hf.py), recipes from ir/hf_recipes.py.
"""
from __future__ import annotations

from plait.ir import kinds
from plait.ir.errors import PlaitError
from plait.ir.hf_recipes import Recipe, Ref, Stack, refs
from plait.ir.model import ModelSpec

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")
HYBRID = ("nemotron_h",)
SUPPORTED = LLAMA_LIKE + HYBRID


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
    names = kinds.facet(kind, "hf")
    if names.DECODER_SLOT != i % 2:
        raise PlaitError(f"layer {i} ({kind}) does not fit the [attention, mlp|moe] decoder-layer pairs "
                         f"of a llama-family checkpoint", hint=f"model pattern is {spec.pattern!r}")
    p = f"model.layers.{decoder}."
    if rest.startswith("norm."):
        return [Ref(p + names.DECODER_NORM + rest.split(".", 1)[1])]
    return names.llama_names(spec, p, rest.split(".", 1)[1])  # drop 'mixer.'


def _nemotron_h(spec: ModelSpec, name: str, prefix: str) -> list:
    top = _top_level(name, prefix + "embeddings.weight", prefix + "norm_f.")
    if top is not None:
        return top
    i, rest = _split(name)
    p = f"{prefix}layers.{i}."
    if rest.startswith("norm."):
        return [Ref(p + rest)]
    return kinds.facet(spec.layers[i], "hf").hybrid_names(spec, p, rest.split(".", 1)[1])


# ---- export: reference tensors -> the checkpoint names a family's hub checkpoints use ------------
def _hub_fits(model_type: str, names: list[str]) -> bool:
    """Names in the layout transformers' save_pretrained writes for this family: Mixtral's
    block_sparse_moe experts w1/w2/w3, Qwen-MoE's mlp.experts.{e} and mlp.shared_expert,
    DeepSeek-V3's mlp.experts.{e} and mlp.shared_experts, Nemotron-H's backbone prefix."""
    if model_type == "mixtral":
        return not any(".mlp." in n for n in names)
    if model_type in ("qwen2_moe", "qwen3_moe"):
        return not any("block_sparse_moe" in n for n in names)
    if model_type == "deepseek_v3":
        return not any("block_sparse_moe" in n or ".shared_expert." in n for n in names)
    if model_type in HYBRID:
        return all(n.startswith("backbone.") or n == "lm_head.weight" for n in names)
    return True


# What transformers keeps in fp32 whatever the model's dtype (its _keep_in_fp32_modules_strict), so
# that its save_pretrained writes them in fp32 too: the router of the sigmoid-routed families and
# its expert bias, whose small per-expert offsets decide the top-k (bf16 keeps ~3 digits).
FP32_KEPT = {"deepseek_v3": ("gate.weight", "gate.e_score_correction_bias"),
             "nemotron_h": ("gate.weight", "gate.e_score_correction_bias")}


def kept_in_fp32(model_type: str, hf_name: str) -> bool:
    """Whether the family keeps checkpoint tensor ``hf_name`` in fp32 (see FP32_KEPT)."""
    return any(hf_name.endswith("." + n) for n in FP32_KEPT.get(model_type, ()))


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
