"""`model "name" { ... }` -> ModelSpec: blocks, layer composition and the architecture checks."""
from __future__ import annotations

from typing import Optional

from plait.ir.model import (ACTIVATIONS, BLOCK_KINDS, MLP, PATTERN_SYMBOLS, Attention, LatentKV, Mamba2,
                            ModelSpec, MoE, Norm, Rope, RopeScaling)

from . import ast
from .reader import Context, Reader, describe, did_you_mean, to_int

MAX_LAYERS = 100_000  # far beyond any real model; stops `10**9 * [attention]` from eating memory
ROPE_SCALINGS = ("linear", "yarn", "llama3")


def resolve_model(ctx: Context, decl: ast.Decl) -> ModelSpec:
    r = Reader(ctx, decl.block.entries, f'model "{decl.name}"', decl.pos)
    vocab, hidden = r.int("vocab"), r.int("hidden")
    attention = r.block("attention")
    blocks = {
        "attention": _attention(attention, hidden),
        "mlp": _mlp(r.block("mlp")),
        "moe": _moe(r.block("moe")),
        "mamba": _mamba(r.block("mamba"), hidden),
    }
    layers = _layers(ctx, r, blocks)
    if blocks["attention"] is not None:
        _check_full_layers(attention, blocks["attention"], layers.count("attention"))
    spec = ModelSpec(
        name=decl.name, vocab=vocab, hidden=hidden, layers=layers,
        norm=_norm(ctx, r.value("norm", None)) or Norm(),
        tie_embeddings=r.bool("tie_embeddings", False),
        max_seq=r.int("max_seq", None),
        learned_positions=r.bool("learned_positions", False),
        **blocks,
    )
    if spec.learned_positions and spec.max_seq is None:
        raise ctx.error("learned_positions needs max_seq (the number of position embeddings)",
                        r.entries["learned_positions"].pos, hint="add max_seq = 2048")
    r.finish()
    return spec


def _norm(ctx: Context, value) -> Optional[Norm]:
    if value is None:
        return None
    kinds = ("rmsnorm", "layernorm")
    if isinstance(value, ast.Ident) and value.name in kinds:
        return Norm(kind=value.name)
    if isinstance(value, ast.Call) and value.name in kinds:
        r = Reader.of_call(ctx, value)
        norm = Norm(kind=value.name, eps=r.float("eps", 1e-5, positive=True))
        r.finish()
        return norm
    name = getattr(value, "name", "")
    raise ctx.error(f"norm must be rmsnorm(eps = ...) or layernorm(eps = ...), got {describe(value)}",
                    value.pos, hint=did_you_mean(name, kinds))


def _attention(r: Optional[Reader], hidden: int) -> Optional[Attention]:
    if r is None:
        return None
    heads = r.int("heads")
    latent = _latent(r)
    kv_heads = r.int("kv_heads", heads)
    if heads % kv_heads:
        raise r.ctx.error(f"kv_heads ({kv_heads}) must divide heads ({heads})",
                          r.entries["kv_heads"].value.pos,
                          hint="grouped-query attention shares each kv head by heads / kv_heads query heads")
    head_dim = r.int("head_dim", None if latent is None else latent.qk_head_dim)
    if head_dim is None:
        if hidden % heads:
            raise r.ctx.error(f"hidden ({hidden}) is not divisible by heads ({heads})", r.pos,
                              hint="set head_dim explicitly")
        head_dim = hidden // heads
    spec = Attention(heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                     qkv_bias=r.bool("qkv_bias", False), out_bias=r.bool("out_bias", False),
                     qk_norm=r.bool("qk_norm", False),
                     rope=_rope(r.ctx, r.value("rope", example="rope(theta = 10000) or rope = none")),
                     window=r.int("window", None), full_layers=_full_layers(r), latent=latent)
    if latent is not None:
        _check_latent(r, spec)
    r.finish()
    return spec


_LATENT_DIMS = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def _latent(r: Reader) -> Optional[LatentKV]:
    """``latent = mla(kv_lora_rank = 512, q_lora_rank = 1536, qk_nope_head_dim = 128,
    qk_rope_head_dim = 64, v_head_dim = 128)``: multi-head latent attention (DeepSeek-V2/V3)."""
    value = r.value("latent", None)
    if value is None:
        return None
    if not (isinstance(value, ast.Call) and value.name == "mla"):
        raise r.ctx.error(f"latent must be mla(kv_lora_rank = ..., ...), got {describe(value)}", value.pos)
    m = Reader.of_call(r.ctx, value)
    latent = LatentKV(**{k: m.int(k) for k in _LATENT_DIMS}, q_lora_rank=m.int("q_lora_rank", None),
                      rope_interleave=m.bool("rope_interleave", True))
    if latent.qk_rope_head_dim % 2:
        raise r.ctx.error(f"qk_rope_head_dim ({latent.qk_rope_head_dim}) must be even: rotary dims turn in "
                          "pairs", m.entries["qk_rope_head_dim"].value.pos)
    m.finish()
    return latent


def _check_latent(r: Reader, spec: Attention) -> None:
    """MLA expands its keys and values per query head, from a latent that carries no bias or norm
    options of GQA's projections."""
    def at(key):
        entry = r.entries.get(key)
        return entry.value.pos if entry is not None else r.pos

    lat = spec.latent
    if spec.kv_heads != spec.heads:
        raise r.ctx.error(f"multi-head latent attention has one key/value head per query head: kv_heads "
                          f"({spec.kv_heads}) != heads ({spec.heads})", at("kv_heads"), hint="drop kv_heads")
    if spec.head_dim != lat.qk_head_dim:
        raise r.ctx.error(f"head_dim ({spec.head_dim}) must be qk_nope_head_dim + qk_rope_head_dim "
                          f"({lat.qk_nope_head_dim} + {lat.qk_rope_head_dim} = {lat.qk_head_dim})",
                          at("head_dim"), hint="drop head_dim")
    for key in ("qkv_bias", "out_bias", "qk_norm"):
        if getattr(spec, key):
            raise r.ctx.error(f"{key} is not an option of multi-head latent attention", at(key))
    if spec.rope is None:
        raise r.ctx.error("multi-head latent attention rotates its decoupled qk_rope_head_dim: it needs "
                          "rope", at("rope"), hint="rope = rope(theta = 10000)")


def _full_layers(r: Reader) -> tuple[int, ...]:
    """``full_layers = [0, 1]``: attention layers (counted from 0 among attention layers) that keep
    full causal attention in a model with a sliding window."""
    value = r.value("full_layers", None)
    if value is None:
        return ()
    if not isinstance(value, ast.ListValue):
        raise r.ctx.error(f"full_layers must be a list of attention layer indices such as [0, 1], got "
                          f"{describe(value)}", value.pos)
    indices = tuple(to_int(r.ctx, item, "an attention layer index", minimum=0) for item in value.items)
    for i, index in enumerate(indices):
        if index in indices[:i]:
            raise r.ctx.error(f"attention layer {index} is listed twice in full_layers", value.items[i].pos)
    if "window" not in r.entries:
        raise r.ctx.error("full_layers without a window: every attention layer is already full",
                          r.entries["full_layers"].pos, hint="add window = 4096, or drop full_layers")
    return tuple(sorted(indices))


def _check_full_layers(r: Reader, spec: Attention, count: int) -> None:
    """Indices must name attention layers, and a window must be used by some layer."""
    if not spec.full_layers:
        return
    entry = r.entries["full_layers"]
    too_big = [i for i in spec.full_layers if i >= count]
    if too_big:
        raise r.ctx.error(f"full_layers names attention layer {too_big[0]}, but the model has {count} "
                          f"attention layers (0 to {count - 1})", entry.value.pos)
    if len(spec.full_layers) == count:
        raise r.ctx.error(f"full_layers lists all {count} attention layers: the window is never used",
                          entry.pos, hint="drop window and full_layers for full attention everywhere")


def _rope(ctx: Context, value) -> Optional[Rope]:
    if isinstance(value, ast.Ident) and value.name == "none":
        return None
    if isinstance(value, ast.Ident) and value.name == "rope":
        return Rope()
    if not (isinstance(value, ast.Call) and value.name == "rope"):
        raise ctx.error(f"rope must be rope(theta = ...) or none, got {describe(value)}", value.pos)
    r = Reader.of_call(ctx, value)
    theta = r.float("theta", 10000.0, positive=True)
    scaling = r.value("scaling", None)
    rope = Rope(theta=theta, scaling=None if scaling is None else _rope_scaling(ctx, scaling))
    r.finish()
    return rope


def _rope_scaling(ctx: Context, value) -> RopeScaling:
    if not (isinstance(value, ast.Call) and value.name in ROPE_SCALINGS):
        raise ctx.error(f"scaling must be one of {', '.join(f'{s}(...)' for s in ROPE_SCALINGS)}; got "
                        f"{describe(value)}", value.pos,
                        hint=did_you_mean(getattr(value, "name", ""), ROPE_SCALINGS))
    r = Reader.of_call(ctx, value)
    kind = value.name
    fields = dict(kind=kind, factor=r.float("factor", positive=True))
    if kind != "linear":
        fields["original_max_positions"] = r.int("original_max_positions")
    if kind == "yarn":
        fields.update(beta_fast=r.float("beta_fast", 32.0), beta_slow=r.float("beta_slow", 1.0),
                      mscale=r.float("mscale", None, positive=True),
                      mscale_all_dim=r.float("mscale_all_dim", None, positive=True))
    if kind == "llama3":
        fields.update(low_freq_factor=r.float("low_freq_factor", 1.0, positive=True),
                      high_freq_factor=r.float("high_freq_factor", 4.0, positive=True))
    r.finish()
    return RopeScaling(**fields)


def _mlp(r: Optional[Reader]) -> Optional[MLP]:
    if r is None:
        return None
    spec = MLP(ffn=r.int("ffn"), activation=r.choice("activation", ACTIVATIONS, "swiglu"),
               bias=r.bool("bias", False))
    r.finish()
    return spec


def _moe(r: Optional[Reader]) -> Optional[MoE]:
    if r is None:
        return None
    spec = MoE(
        experts=r.int("experts"), top_k=r.int("top_k"), ffn=r.int("ffn"),
        activation=r.choice("activation", ACTIVATIONS, "swiglu"),
        shared_ffn=r.int("shared_ffn", 0, minimum=0), shared_gate=r.bool("shared_gate", False),
        router=r.choice("router", ("softmax", "sigmoid"), "softmax"),
        pre_softmax=r.bool("pre_softmax", False), norm_topk=r.bool("norm_topk", True),
        expert_bias=r.bool("expert_bias", False),
        groups=r.int("groups", 1), topk_groups=r.int("topk_groups", 1), group_top=r.int("group_top", 0, minimum=0),
        scaling_factor=r.float("scaling_factor", 1.0, positive=True),
        aux_loss=r.float("aux_loss", 0.0, minimum=0.0), z_loss=r.float("z_loss", 0.0, minimum=0.0),
    )
    _check_moe(r, spec)
    r.finish()
    return spec


def _check_moe(r: Reader, m: MoE) -> None:
    def at(key):
        entry = r.entries.get(key)
        return entry.value.pos if entry is not None else r.pos

    if m.top_k > m.experts:
        raise r.ctx.error(f"top_k ({m.top_k}) exceeds experts ({m.experts})", at("top_k"))
    if m.experts % m.groups:
        raise r.ctx.error(f"groups ({m.groups}) must divide experts ({m.experts})", at("groups"),
                          hint="group-limited routing splits the experts into equal groups")
    if m.topk_groups > m.groups:
        raise r.ctx.error(f"topk_groups ({m.topk_groups}) exceeds groups ({m.groups})", at("topk_groups"))
    eligible = m.topk_groups * (m.experts // m.groups)
    if m.top_k > eligible:
        raise r.ctx.error(f"top_k ({m.top_k}) exceeds the {eligible} experts in the best topk_groups "
                          f"({m.topk_groups}) groups of {m.experts // m.groups}", at("top_k"))
    if m.groups > 1 and not 0 < m.group_score_top <= m.experts // m.groups:
        raise r.ctx.error(f"a group's score sums its best {m.group_score_top} experts, but a group has "
                          f"{m.experts // m.groups}", at("group_top" if m.group_top else "topk_groups"),
                          hint="group_top sets how many experts score a group")
    if m.shared_gate and not m.shared_ffn:
        raise r.ctx.error("shared_gate needs a shared expert", at("shared_gate"), hint="set shared_ffn")


def _mamba(r: Optional[Reader], hidden: int) -> Optional[Mamba2]:
    if r is None:
        return None
    spec = Mamba2(heads=r.int("heads"), head_dim=r.int("head_dim"), groups=r.int("groups", 1),
                  state=r.int("state"), conv=r.int("conv", 4), chunk=r.int("chunk", 128),
                  conv_bias=r.bool("conv_bias", True), proj_bias=r.bool("proj_bias", False),
                  dt_min=r.float("dt_min", 0.0, minimum=0.0))
    if spec.heads % spec.groups:
        raise r.ctx.error(f"mamba heads ({spec.heads}) must be divisible by groups ({spec.groups})",
                          r.entries["groups"].value.pos)
    expand = r.float("expand", None, positive=True)
    if expand is not None and spec.d_inner != expand * hidden:
        raise r.ctx.error(f"expand ({expand:g}) disagrees with heads * head_dim / hidden "
                          f"({spec.heads} * {spec.head_dim} / {hidden} = {spec.d_inner / hidden:g})",
                          r.entries["expand"].value.pos, hint="drop expand or fix heads / head_dim")
    r.finish()
    return spec


def _layers(ctx: Context, r: Reader, blocks: dict) -> tuple[str, ...]:
    has_layers, has_pattern = r.has("layers"), r.has("pattern")
    if has_layers and has_pattern:
        raise ctx.error("give either layers or pattern, not both", r.entries["pattern"].pos)
    if not (has_layers or has_pattern):
        raise ctx.error(f"{r.where} is missing 'layers'", r.pos,
                        hint="add layers = 32 * [attention, mlp] or pattern = \"M-M*-\"")
    if has_pattern:
        layers = _pattern(ctx, r.value("pattern"))
    else:
        layers = tuple(_layer_expr(ctx, r.value("layers")))
    _check_blocks(ctx, r, layers, blocks)
    return layers


def _pattern(ctx: Context, value) -> tuple[str, ...]:
    if not isinstance(value, ast.String):
        raise ctx.error(f"pattern must be a string such as \"M-M*-\", got {describe(value)}", value.pos)
    layers = []
    for i, symbol in enumerate(value.value):
        if symbol not in PATTERN_SYMBOLS:
            known = ", ".join(f"{s} {k}" for s, k in PATTERN_SYMBOLS.items())
            raise ctx.error(f"unknown pattern symbol {symbol!r}", ast.Pos(value.pos.line, value.pos.col + 1 + i),
                            hint=f"symbols: {known}")
        layers.append(PATTERN_SYMBOLS[symbol])
    if not layers:
        raise ctx.error("pattern is empty", value.pos)
    return tuple(layers)


def _layer_expr(ctx: Context, value) -> list[str]:
    """Flatten a layer expression: names, lists, `n * list` and `a + b`."""
    if isinstance(value, ast.Ident):
        if value.name not in BLOCK_KINDS:
            raise ctx.error(f"unknown block kind '{value.name}' in layers", value.pos,
                            hint=did_you_mean(value.name, BLOCK_KINDS) or f"kinds: {', '.join(BLOCK_KINDS)}")
        return [value.name]
    if isinstance(value, ast.ListValue):
        return [kind for item in value.items for kind in _layer_expr(ctx, item)]
    if isinstance(value, ast.Concat):
        return [kind for part in value.parts for kind in _layer_expr(ctx, part)]
    if isinstance(value, ast.Repeat):
        count, body = (value.left, value.right) if isinstance(value.left, ast.Quantity) else (value.right, value.left)
        n = to_int(ctx, count, "a repeat count")
        unit = _layer_expr(ctx, body)
        if n * len(unit) > MAX_LAYERS:
            raise ctx.error(f"{n} * {len(unit)} layers is more than {MAX_LAYERS}", value.pos)
        return unit * n
    raise ctx.error(f"layers must be block kinds such as 32 * [attention, mlp], got {describe(value)}",
                    value.pos)


def _check_blocks(ctx: Context, r: Reader, layers: tuple[str, ...], blocks: dict) -> None:
    if not layers:
        raise ctx.error("a model needs at least one layer", r.entries["layers"].pos)
    for kind in BLOCK_KINDS:
        used, defined = kind in layers, blocks[kind] is not None
        key = "pattern" if "pattern" in r.entries else "layers"
        if used and not defined:
            raise ctx.error(f"layers use '{kind}' but the model defines no {kind} block",
                            r.entries[key].value.pos, hint=f"add {kind} {{ ... }} to the model")
        if defined and not used:
            raise ctx.error(f"the {kind} block is defined but no layer uses it", r.entries[kind].pos,
                            hint=f"add {kind} to {key} or remove the block")
