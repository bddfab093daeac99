"""Attention's dsl facet: the `attention { ... }` block of a model spec (GQA, multi-head latent
attention, sliding windows, RoPE and its scalings), read into ``Attention`` and written back in
canonical form, and the prune axis that narrows it.

The dsl-facet protocol: every kind's ``plait/kinds/<kind>/dsl.py`` defines these, and ir/dsl
(models.py, fmt.py, prune.py, jobs.py) calls them for each kind of the registry:

    read(r, hidden) -> block | None           the block of `<kind> { ... }` (r: a Reader, None when
                                              the model has no such block); located SpecErrors
    check_layers(r, block, layers) -> None    checks that need the model's layer list
    format_block(block, model) -> list        canonical (key, text) entries, parse(format) == block
    HYBRID: bool                              a model with this kind is written as a hybrid pattern
    PRUNE_AXES: tuple[str, ...]               the prune axes (ir/job.py PRUNE_AXES) narrowing it
    axis_width(model, axis) -> int            the model's width on one of them
    structure_problem(model, axis, width) -> (problem, hint) | None
                                              why ``width`` would break the block, if it would
    JOB_OPTIONS: type | None                  the kind's options in a train job (`<kind> { ... }`
                                              there, TrainJob.<kind>); None: it takes none
    read_job_options(r) -> options            from that block (r None: the defaults)
    format_job_options(options) -> list       canonical entries of non-default options
    document_mask_problem(model) -> str | None   why its layers cannot keep packed documents
                                              apart (document_mask = true), if they cannot

Imports only ir.
"""
from __future__ import annotations

from typing import Optional

from plait.ir.dsl import ast
from plait.ir.dsl.literals import call, changed, number
from plait.ir.dsl.reader import Context, Reader, describe, did_you_mean, to_int
from plait.ir.model import Attention, LatentKV, ModelSpec, Rope, RopeScaling
from plait.kinds import absent

ROPE_SCALINGS = ("linear", "yarn", "llama3")
HYBRID = False
PRUNE_AXES = ("attention_heads",)
JOB_OPTIONS = None


def read(r: Optional[Reader], hidden: int) -> Optional[Attention]:
    """The block of a model's `attention { ... }` (None: the model has none)."""
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


def check_layers(r: Reader, block: Attention, layers: tuple[str, ...]) -> None:
    """full_layers must name attention layers, and a window must be used by some layer."""
    count = layers.count("attention")
    if not block.full_layers:
        return
    entry = r.entries["full_layers"]
    too_big = [i for i in block.full_layers if i >= count]
    if too_big:
        raise r.ctx.error(f"full_layers names attention layer {too_big[0]}, but the model has {count} "
                          f"attention layers (0 to {count - 1})", entry.value.pos)
    if len(block.full_layers) == count:
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


# --- canonical text ----------------------------------------------------------------------------

def format_block(block: Attention, model: ModelSpec) -> list:
    """Canonical entries of the block (ir/dsl/fmt.py writes them)."""
    entries = [("heads", number(block.heads))]
    if block.latent is not None:  # kv_heads and head_dim follow from the latent
        entries.append(("latent", _latent_text(block.latent)))
    else:
        entries += [("kv_heads", number(block.kv_heads)), ("head_dim", number(block.head_dim))]
    entries += changed(block, ("qkv_bias", "out_bias", "qk_norm"))
    entries.append(("rope", _rope_text(block.rope)))
    if block.window is not None:
        entries.append(("window", number(block.window, tokens=True)))
    if block.full_layers:
        entries.append(("full_layers", "[" + ", ".join(map(number, block.full_layers)) + "]"))
    return entries


def _latent_text(lat: LatentKV) -> str:
    args = [(k, number(getattr(lat, k))) for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                                      "v_head_dim")]
    if lat.q_lora_rank is not None:
        args.append(("q_lora_rank", number(lat.q_lora_rank)))
    return call("mla", args + changed(lat, ("rope_interleave",)))


def _rope_text(rope: Optional[Rope]) -> str:
    if rope is None:
        return "none"
    args = [("theta", number(rope.theta))]
    if rope.scaling is not None:
        args.append(("scaling", _rope_scaling_text(rope.scaling)))
    return call("rope", args)


def _rope_scaling_text(s: RopeScaling) -> str:
    keys = {"linear": (), "yarn": ("original_max_positions", "beta_fast", "beta_slow"),
            "llama3": ("original_max_positions", "low_freq_factor", "high_freq_factor")}[s.kind]
    args = [("factor", number(s.factor))] + [(k, number(getattr(s, k))) for k in keys]
    args += [(k, number(getattr(s, k))) for k in ("mscale", "mscale_all_dim") if getattr(s, k) is not None]
    return call(s.kind, args)


# --- pruning -----------------------------------------------------------------------------------

def axis_width(model: ModelSpec, axis: str) -> int:
    return model.block("attention").heads


def structure_problem(model: ModelSpec, axis: str, width: int) -> Optional[tuple[str, str]]:
    kv = model.block("attention").kv_heads
    if width % kv:
        return (f"attention heads ({width}) must be a multiple of kv_heads ({kv}): {width} % {kv} = "
                f"{width % kv}", "the same number of query heads is kept in every KV group")
    return None


read_job_options = absent.no_job_options
format_job_options = absent.no_job_option_entries


def document_mask_problem(model: ModelSpec) -> Optional[str]:
    """Attention reads the packed documents' block-diagonal mask: nothing to refuse."""
    return None
