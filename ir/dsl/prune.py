"""`prune "name" { ... }` -> PruneJob: the model and its weights, budgets, the axes that may narrow,
the layouts the result must still run under, calibration and distillation settings.

    prune "nemotron-h-8b-4.5b" {
      model = "nemotron-h-8b"
      weights = "nemotron-h-8b.safetensors"          # optional: without it only --plan-only works
      train = "nemotron-h-8b-8gpu"                    # optional: the setup throughput refers to
      target { params = 4.5e9 }                       # params, active_params, weight_memory, throughput
      axes { hidden = auto, ffn = range(min = 8192), mamba_heads = 112, depth = [mamba, mlp] }
      layout { tp = 2 }                               # the pruned model must still run under these
      calibration { samples = 64, seq_len = 128 }
      distill { steps = 100, temperature = 1.0, lm_loss = 0.0 }
    }

Structural checks happen here, with locations: an axis the model does not have, a fixed width that
widens or breaks a block (heads not a multiple of the KV groups, mamba heads not a multiple of the
groups, fewer experts than top_k), an empty range.
"""
from __future__ import annotations

from typing import Callable, Optional

from plait.ir import kinds
from plait.ir.job import PRUNE_AXES, AxisSearch, Calibration, Distill, PruneJob, PruneTarget, TrainJob
from plait.ir.model import BLOCK_KINDS, ModelSpec

from . import ast
from .datablock import data_path
from .jobs import PRECISIONS, read_layout_pins, read_optimizer
from .reader import Context, Reader, describe, did_you_mean, to_int

METHODS = ("activation", "magnitude", "random")

Finder = Callable[[str, ast.Pos], object]


def resolve_prune(ctx: Context, decl: ast.Decl, find_model: Finder, find_train: Finder,
                  base_dir: Optional[str]) -> PruneJob:
    r = Reader(ctx, decl.block.entries, f'prune "{decl.name}"', decl.pos)
    model_ref = r.value("model", example='"nemotron-h-8b"')
    model: ModelSpec = find_model(_string(ctx, model_ref, "model"), model_ref.pos)
    train = None
    if r.has("train"):
        train_ref = r.value("train")
        train = find_train(_string(ctx, train_ref, "train"), train_ref.pos)
    axes, depth = _axes(r.block("axes"), model)
    target = _target(r.block("target"), train, r)
    if target.empty and (depth or any(a.mode == "search" for a in axes)):
        raise ctx.error(f'prune "{decl.name}" searches widths or depth but sets no target', decl.pos,
                        hint="add target { params = ... } (or active_params, weight_memory, throughput)")
    job = PruneJob(
        name=decl.name, model=model, target=target, axes=axes, depth=depth,
        weights=_path(r, "weights", base_dir), train=train, layout=read_layout_pins(r.block("layout")),
        calibration=_calibration(r.block("calibration"), base_dir),
        distill=_distill(r.block("distill"), base_dir), output=_path(r, "output", base_dir),
    )
    r.finish()
    return job


def _string(ctx: Context, value, what: str) -> str:
    if isinstance(value, ast.String):
        return value.value
    hint = f'write {what} = "{value.name}"' if isinstance(value, ast.Ident) else None
    raise ctx.error(f"{what} must name a declaration, got {describe(value)}", value.pos, hint=hint)


def _path(r: Reader, key: str, base_dir: Optional[str]) -> Optional[str]:
    text = r.string(key, None)
    return None if text is None else data_path(text, base_dir)


# --- target ------------------------------------------------------------------------------------

def _target(r: Optional[Reader], train: Optional[TrainJob], outer: Reader) -> PruneTarget:
    if r is None:
        return PruneTarget()
    target = PruneTarget(
        params=r.int("params", None), active_params=r.int("active_params", None),
        weight_memory=r.quantity("weight_memory", "bytes", None),
        precision=r.choice("precision", PRECISIONS, "bf16"),
        throughput=r.float("throughput", None, positive=True),
    )
    if target.throughput is not None and train is None:
        raise r.ctx.error("a throughput target needs the training setup it refers to",
                          r.entries["throughput"].pos,
                          hint='add train = "<a train declaration>" to the prune job (its cluster, '
                               "batch, sequence length and precision)")
    r.finish()
    return target


# --- axes --------------------------------------------------------------------------------------

def _axes(r: Optional[Reader], model: ModelSpec) -> tuple[tuple[AxisSearch, ...], tuple[str, ...]]:
    if r is None:
        return (), ()
    axes = []
    for name in PRUNE_AXES:
        value = r.value(name, None)
        if value is not None:
            axes.append(_axis(r, name, value, model))
    depth = _depth(r, r.value("depth", None), model)
    r.finish()
    return tuple(a for a in axes if a.mode != "keep"), depth


def _axis(r: Reader, name: str, value, model: ModelSpec) -> AxisSearch:
    ctx = r.ctx
    kind = axis_kind(name)
    if kind is not None and kind not in model.layers:
        raise ctx.error(f'model "{model.name}" has no {kind} layers to prune {name} of',
                        r.entries[name].pos, hint=f"remove {name}")
    original = axis_width(model, name)
    if isinstance(value, ast.Ident) and value.name in ("auto", "keep"):
        return AxisSearch(name, "search" if value.name == "auto" else "keep")
    if isinstance(value, ast.Quantity):
        width = to_int(ctx, value, name)
        _check_width(ctx, model, name, width, original, value.pos)
        return AxisSearch(name, "fixed", value=width)
    if isinstance(value, ast.Call) and value.name == "range":
        return _range(ctx, value, model, name, original)
    raise ctx.error(f"{name} must be auto, keep, a width or range(min = ..., max = ..., step = ...); "
                    f"got {describe(value)}", value.pos,
                    hint=did_you_mean(getattr(value, "name", ""), ("auto", "keep", "range")))


def _range(ctx: Context, call: ast.Call, model: ModelSpec, name: str, original: int) -> AxisSearch:
    r = Reader.of_call(ctx, call)
    low, high, step = r.int("min", None), r.int("max", None), r.int("step", None)
    for key, width in (("min", low), ("max", high)):
        if width is not None and width > original:
            raise ctx.error(f"{name} {key} ({width}) exceeds the model's {name} ({original}): pruning "
                            "cannot widen", r.entries[key].value.pos)
    if low is not None and high is not None and low > high:
        raise ctx.error(f"{name} range is empty: min ({low}) > max ({high})", call.pos)
    r.finish()
    return AxisSearch(name, "search", low=low, high=high, step=step)


def axis_kind(name: str) -> Optional[str]:
    """The block kind prune axis ``name`` narrows (each kind's dsl facet lists its PRUNE_AXES);
    None for hidden, which every layer shares."""
    if name == "hidden":
        return None
    owners = [kind for kind in kinds.names() if name in kinds.facet(kind, "dsl").PRUNE_AXES]
    if not owners:
        raise KeyError(f"unknown prune axis {name!r}; axes: {', '.join(PRUNE_AXES)}")
    return owners[0]


def axis_width(model: ModelSpec, name: str) -> int:
    """The model's current width on axis ``name``."""
    kind = axis_kind(name)
    return model.hidden if kind is None else kinds.facet(kind, "dsl").axis_width(model, name)


def structure_problem(model: ModelSpec, name: str, width: int) -> Optional[tuple[str, str]]:
    """(problem, hint) when ``width`` on axis ``name`` would break a block's structure, else None."""
    kind = axis_kind(name)
    return None if kind is None else kinds.facet(kind, "dsl").structure_problem(model, name, width)


def _check_width(ctx: Context, model: ModelSpec, name: str, width: int, original: int, pos: ast.Pos) -> None:
    if width > original:
        raise ctx.error(f"{name} = {width} exceeds the model's {name} ({original}): pruning cannot widen", pos)
    problem = structure_problem(model, name, width)
    if problem is not None:
        raise ctx.error(problem[0], pos, hint=problem[1])


def _depth(r: Reader, value, model: ModelSpec) -> tuple[str, ...]:
    present = tuple(dict.fromkeys(model.layers))
    if value is None or (isinstance(value, ast.Ident) and value.name == "keep"):
        return ()
    if isinstance(value, ast.Ident) and value.name == "auto":
        return present
    if not isinstance(value, ast.ListValue):
        raise r.ctx.error(f"depth must be auto, keep or a list of block kinds such as [mamba, mlp]; got "
                          f"{describe(value)}", value.pos)
    kinds = []
    for item in value.items:
        name = getattr(item, "name", None)
        if not isinstance(item, ast.Ident) or name not in BLOCK_KINDS:
            raise r.ctx.error(f"depth lists block kinds ({', '.join(BLOCK_KINDS)}); got {describe(item)}",
                              item.pos, hint=did_you_mean(name or "", BLOCK_KINDS))
        if name not in present:
            raise r.ctx.error(f'model "{model.name}" has no {name} layers', item.pos,
                              hint=f"its layers are {', '.join(present)}")
        kinds.append(name)
    return tuple(k for k in present if k in kinds)


# --- calibration and distillation ----------------------------------------------------------------

def _calibration(r: Optional[Reader], base_dir: Optional[str]) -> Calibration:
    if r is None:
        return Calibration()
    d = Calibration()
    cal = Calibration(
        data=_path(r, "data", base_dir), samples=r.int("samples", d.samples), seq_len=r.int("seq_len", d.seq_len),
        batch=r.int("batch", d.batch), seed=r.int("seed", d.seed, minimum=0),
        method=r.choice("method", METHODS, d.method), depth=r.choice("depth", ("cosine", "perplexity"), d.depth),
    )
    r.finish()
    return cal


def _distill(r: Optional[Reader], base_dir: Optional[str]) -> Distill:
    if r is None:
        return Distill()
    d = Distill()
    optimizer = r.value("optimizer", None)
    lm_loss = r.float("lm_loss", d.lm_loss, minimum=0.0)
    if lm_loss > 1:
        raise r.ctx.error(f"lm_loss is the weight of the LM loss in [0, 1], got {lm_loss:g}",
                          r.entries["lm_loss"].value.pos)
    out = Distill(
        steps=r.int("steps", d.steps, minimum=0), global_batch=r.int("global_batch", d.global_batch),
        seq_len=r.int("seq_len", d.seq_len), temperature=r.float("temperature", d.temperature, positive=True),
        lm_loss=lm_loss, optimizer=d.optimizer if optimizer is None else read_optimizer(r.ctx, optimizer),
        data=_path(r, "data", base_dir), seed=r.int("seed", d.seed, minimum=0),
        checkpoint_every=r.int("checkpoint_every", d.checkpoint_every),
    )
    r.finish()
    return out
