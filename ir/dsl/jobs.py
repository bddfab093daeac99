"""`train "name" { ... }` -> TrainJob: references, precision, optimizer, the kinds' option blocks
(MoE's dispatcher, read by its dsl facet), layout pins."""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

from plait.ir import kinds
from plait.ir.cluster import Cluster, local_cpu
from plait.ir.job import LAYOUT_KEYS, Data, LayoutPins, Optimizer, Precision, TrainJob
from plait.ir.model import ModelSpec
from plait.ir.precision import DEFAULT_BF16_ENDS, fp8_ends_problem
from plait.ir.plan import CP_COMMS, DEFAULT_ORDER, DISPATCHERS, RECOMPUTE

from . import ast
from .datablock import (check_blend, data_path, packing_options, resolve_data_block,
                        tokenizer_name, validation_options)
from .hardware import resize
from .reader import Context, Reader, describe, did_you_mean, to_float, to_string

PRECISIONS = ("bf16", "fp32", "fp8")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant", "linear")
INT_PINS = ("tp", "cp", "dp", "pp", "vpp", "ep", "etp", "edp", "mbs", "dp_shard")
OPTIMIZER_DEFAULTS = Optimizer()

Finder = Callable[[str, ast.Pos], object]


def resolve_job(ctx: Context, decl: ast.Decl, find_model: Finder, find_cluster: Finder,
                base_dir: Optional[str]) -> TrainJob:
    r = Reader(ctx, decl.block.entries, f'train "{decl.name}"', decl.pos)
    model: ModelSpec = find_model(*_reference(r, "model", '"llama-3.1-8b"'))
    cluster = _cluster(ctx, r, find_cluster)
    seq_len = r.int("seq_len")
    if model.max_seq is not None and seq_len > model.max_seq:
        raise ctx.error(f"seq_len ({seq_len}) exceeds the model's max_seq ({model.max_seq})",
                        r.entries["seq_len"].value.pos, hint=f"raise max_seq of model \"{model.name}\"")
    option_blocks = _kind_option_blocks(ctx, r, model)
    job = TrainJob(
        name=decl.name, model=model, cluster=cluster,
        global_batch=r.int("global_batch"), seq_len=seq_len,
        precision=_precision(ctx, r.value("precision", None), model),
        optimizer=read_optimizer(ctx, r.value("optimizer", None)),
        **{kind: kinds.facet(kind, "dsl").read_job_options(block) for kind, block in option_blocks.items()},
        layout=read_layout_pins(r.block("layout")),
        steps=r.int("steps", 100), seed=r.int("seed", 0, minimum=0), timeout=_timeout(ctx, r),
    )
    data = r.raw("data", None)
    if isinstance(data, ast.Block):
        job = replace(job, data=resolve_data_block(ctx, data, r.entries["data"].pos, base_dir,
                                                   model))
        check_blend(ctx, job, data)
    else:
        job = replace(job, data=_data(ctx, data, base_dir, model))
    r.finish()
    return job


def _kind_option_blocks(ctx: Context, r: Reader, model: ModelSpec) -> dict[str, Optional[Reader]]:
    """The `<kind> { ... }` blocks (None: absent) of the kinds that take train-job options (the MoE
    dispatcher), keyed by the TrainJob field of the same name; only for kinds the model has."""
    blocks = {}
    for kind in kinds.names():
        if kinds.facet(kind, "dsl").JOB_OPTIONS is None:
            continue
        block = blocks[kind] = r.block(kind)
        if block is not None and kind not in model.layers:
            raise ctx.error(f'model "{model.name}" has no {kind} layers; remove the {kind} block', block.pos)
    return blocks


def _reference(r: Reader, key: str, example: str) -> tuple[str, ast.Pos]:
    value = r.value(key, example=example)
    return to_string(r.ctx, value, key), value.pos


def _cluster(ctx: Context, r: Reader, find_cluster: Finder) -> Cluster:
    cluster = find_cluster(*_reference(r, "cluster", '"dgx-h100"')) if r.has("cluster") else local_cpu()
    gpus = r.int("gpus", None)
    return cluster if gpus is None else resize(ctx, cluster, gpus, r.entries["gpus"].value.pos)


def _precision(ctx: Context, value, model: ModelSpec) -> Precision:
    if value is None:
        return Precision()
    if isinstance(value, ast.Ident) and value.name in PRECISIONS:
        precision = Precision(kind=value.name)
    elif isinstance(value, ast.Call) and value.name == "fp8":
        precision = _fp8(Reader.of_call(ctx, value))
    else:
        raise ctx.error(f"precision must be bf16, fp32, fp8 or fp8(recipe = ...), got {describe(value)}",
                        value.pos, hint=did_you_mean(getattr(value, "name", ""), PRECISIONS))
    problem = precision.kind == "fp8" and fp8_ends_problem(
        model.num_layers, precision.fp8_skip_first, precision.fp8_skip_last)
    if problem:
        raise ctx.error(problem, value.pos, hint="fp8(bf16_ends = N) with 2 N below the layer count")
    return precision


def _fp8(r: Reader) -> Precision:
    """fp8(recipe = ..., bf16_ends = N) or fp8(skip_first = A, skip_last = B); N, A, B in layers."""
    ends = r.int("bf16_ends", None, minimum=0)
    if ends is not None and (r.has("skip_first") or r.has("skip_last")):
        raise r.ctx.error("give bf16_ends or skip_first / skip_last, not both", r.entries["bf16_ends"].pos)
    default = DEFAULT_BF16_ENDS if ends is None else ends
    precision = Precision(kind="fp8", fp8_recipe=r.choice("recipe", FP8_RECIPES, None),
                          fp8_skip_first=r.int("skip_first", default, minimum=0),
                          fp8_skip_last=r.int("skip_last", default, minimum=0))
    r.finish()
    return precision


def read_optimizer(ctx: Context, value) -> Optimizer:
    if value is None:
        return Optimizer()
    if isinstance(value, ast.Ident) and value.name in OPTIMIZERS:
        return Optimizer(kind=value.name)
    if not (isinstance(value, ast.Call) and value.name in OPTIMIZERS):
        raise ctx.error(f"optimizer must be adamw(...) or sgd(...), got {describe(value)}", value.pos,
                        hint=did_you_mean(getattr(value, "name", ""), OPTIMIZERS))
    r, d = Reader.of_call(ctx, value), OPTIMIZER_DEFAULTS
    optimizer = Optimizer(
        kind=value.name, lr=r.float("lr", d.lr, positive=True), min_lr=r.float("min_lr", d.min_lr, minimum=0.0),
        betas=_betas(ctx, r.value("betas", None), d.betas), eps=r.float("eps", d.eps, positive=True),
        weight_decay=r.float("weight_decay", d.weight_decay, minimum=0.0),
        warmup=r.int("warmup", d.warmup, minimum=0), schedule=r.choice("schedule", SCHEDULES, d.schedule),
        grad_clip=r.float("grad_clip", d.grad_clip, minimum=0.0),
        skip_bad_steps=r.int("skip_bad_steps", d.skip_bad_steps, minimum=0),
    )
    r.finish()
    return optimizer


def _betas(ctx: Context, value, default: tuple[float, float]) -> tuple[float, float]:
    if value is None:
        return default
    if not (isinstance(value, ast.ListValue) and len(value.items) == 2):
        raise ctx.error(f"betas must be a list of two numbers such as [0.9, 0.95], got {describe(value)}",
                        value.pos)
    b1, b2 = (to_float(ctx, v, "betas", minimum=0.0) for v in value.items)
    return (b1, b2)


def read_layout_pins(r: Optional[Reader]) -> LayoutPins:
    """Pins in LAYOUT_KEYS order (so equal layouts compare equal); `auto` pins nothing."""
    if r is None:
        return LayoutPins()
    pins = []
    for key in LAYOUT_KEYS:
        value = r.value(key, None)
        if value is None or (isinstance(value, ast.Ident) and value.name == "auto"):
            continue
        pins.append((key, _pin(r, key, value)))
    r.finish()
    return LayoutPins(tuple(pins))


def _pin(r: Reader, key: str, value):
    if key in INT_PINS:
        return r.int(key)
    if key == "sp":
        return r.bool(key)
    if key == "recompute":
        return r.choice(key, RECOMPUTE)
    if key == "dispatcher":
        return r.choice(key, DISPATCHERS)
    if key == "cp_comm":
        return r.choice(key, CP_COMMS)
    order = r.string(key)  # "order": a permutation of the rank-order dimensions
    if sorted(order.split("-")) != sorted(DEFAULT_ORDER.split("-")):
        raise r.ctx.error(f'order "{order}" must arrange tp, cp, ep, dp, pp joined by "-"', value.pos,
                          hint=f'the default is "{DEFAULT_ORDER}"')
    return order


def _data(ctx: Context, value, base_dir: Optional[str], model: ModelSpec) -> Data:
    if value is None:
        return Data()
    if isinstance(value, ast.Ident) and value.name == "synthetic":
        return Data(synthetic=True)
    if isinstance(value, ast.String):
        return Data(path=data_path(value.value, base_dir))
    if not (isinstance(value, ast.Call) and value.name in ("synthetic", "dataset")):
        raise ctx.error(f'data must be "path", synthetic or dataset(path = ...), got {describe(value)}',
                        value.pos)
    r = Reader.of_call(ctx, value)
    synthetic = value.name == "synthetic"
    path = None if synthetic else r.string("path", None)
    path = None if path is None else data_path(path, base_dir)
    tokenizer = r.value("tokenizer", None)
    data = Data(path=path, synthetic=synthetic, seed=r.int("seed", Data.seed, minimum=0),
                tokenizer=Data.tokenizer if tokenizer is None else tokenizer_name(ctx, tokenizer),
                **validation_options(ctx, r, value.pos), **packing_options(ctx, r, model))
    r.finish()
    return data


def _timeout(ctx: Context, r: Reader) -> float:
    if not r.has("timeout"):
        return TrainJob.timeout
    seconds = r.quantity("timeout", "time")
    if seconds < 1:
        raise ctx.error(f"timeout must be at least 1 s, got {seconds:g} s",
                        r.entries["timeout"].value.pos, hint="e.g. timeout = 120 s")
    return seconds
