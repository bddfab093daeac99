"""`model "name" { ... }` -> ModelSpec: blocks, layer composition and the architecture checks. Each
block kind's `<kind> { ... }` is read by its dsl facet (plait/kinds/<kind>/dsl.py)."""
from __future__ import annotations

from typing import Optional

from plait.ir import kinds
from plait.ir.model import BLOCK_KINDS, PATTERN_SYMBOLS, ModelSpec, Norm

from . import ast
from .reader import Context, Reader, describe, did_you_mean, to_int

MAX_LAYERS = 100_000  # far beyond any real model; stops `10**9 * [attention]` from eating memory


def resolve_model(ctx: Context, decl: ast.Decl) -> ModelSpec:
    r = Reader(ctx, decl.block.entries, f'model "{decl.name}"', decl.pos)
    vocab, hidden = r.int("vocab"), r.int("hidden")
    readers, blocks = {}, {}
    for kind in kinds.names():  # registry order: the first block in error is the one reported
        readers[kind] = r.block(kind)
        blocks[kind] = kinds.facet(kind, "dsl").read(readers[kind], hidden)
    layers = _layers(ctx, r, blocks)
    for kind, block in blocks.items():
        if block is not None:
            kinds.facet(kind, "dsl").check_layers(readers[kind], block, layers)
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
    norms = ("rmsnorm", "layernorm")
    if isinstance(value, ast.Ident) and value.name in norms:
        return Norm(kind=value.name)
    if isinstance(value, ast.Call) and value.name in norms:
        r = Reader.of_call(ctx, value)
        norm = Norm(kind=value.name, eps=r.float("eps", 1e-5, positive=True))
        r.finish()
        return norm
    name = getattr(value, "name", "")
    raise ctx.error(f"norm must be rmsnorm(eps = ...) or layernorm(eps = ...), got {describe(value)}",
                    value.pos, hint=did_you_mean(name, norms))


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
