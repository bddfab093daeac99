"""Training checkpoints in a canonical global form: save every N steps, resume under any layout.

    SAVE_DIR/step-000004/   rank-*.safetensors (chunks), index.json (where each chunk lies in its
                            global tensor), plait.json (what wrote it), manifest.json (written last)
    SAVE_DIR/latest         the newest complete step directory's name

Every tensor is stored in its global (reference-model) shape, as chunks with offsets (see
ckpt_chunks), so a checkpoint written under one plan loads under any other plan of the same model:
tp/sp, pp/vpp, dp/zero1/fsdp, cp, ep/etp/edp, other world sizes. Names say what a tensor is:

    model/<name>                 parameters
    buffer/<name>                persistent buffers (MoE expert biases)
    optim/<name>/<state>         AdamW exp_avg, exp_avg_sq (parameter-shaped) and step; ZeRO-1
                                 shards are gathered along DP into parameter shape first
    rng/rank<r>/{cpu,cuda}       each rank's generators (restored on ranks that exist in both)

The LR schedule and the data order are functions of the step (and the job's seeds), so the step in
plait.json is their whole state. A ZeRO-1 master copy equals its parameter (both are fp32 or both
fp64), so it is rebuilt from the parameters rather than stored.
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from plait.ir.errors import PlaitError
from plait.lowering import collectives as cc

from . import ckpt_store as store
from .ckpt_chunks import Chunk, chunks, local_span, local_tensor
from .ckpt_integrity import (META, finalize, fingerprints, find, read_meta, check_model,
                             step_dir, temp_dir)
from .adamw import fresh_step
from .fsdp import FullyShard
from .zero1 import ZeroOne

MOMENTS = ("exp_avg", "exp_avg_sq")
Entry = tuple[str, torch.Tensor, list[Chunk]]  # global name, the rank's tensor, its chunks

__all__ = ["save", "load", "find", "step_dir", "Saver", "persistent_buffers", "META"]


@lru_cache(maxsize=8)
def global_shapes(spec) -> dict[str, tuple[int, ...]]:
    """Every parameter's and buffer's global shape, from the reference model on the meta device."""
    from plait.lowering.build import build_model

    with torch.device("meta"):
        model = build_model(spec, device="meta", seed=0)
    return {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()}


def persistent_buffers(trainer) -> dict[str, torch.Tensor]:
    """The local stages' buffers that are state: the reference model's persistent buffers (not RoPE
    tables and other derived ones, nor constants torch.fx lifted into buffers)."""
    out, model = {}, global_shapes(trainer.job.model)
    for _, stage in trainer.program.local_modules():
        for name, buf in stage.named_buffers():
            owner, _, leaf = name.rpartition(".")
            if name in model and leaf not in stage.get_submodule(owner)._non_persistent_buffers_set:
                out[name] = buf
    return out


def _full_shape(trainer, name: str) -> tuple[int, ...]:
    shapes = global_shapes(trainer.job.model)
    if name not in shapes:
        raise PlaitError(f"parameter {name!r} is not in model {trainer.job.model.name!r}")
    return shapes[name]


def _param_chunks(trainer, name: str, p: torch.Tensor, fsdp_rows: bool = True) -> list[Chunk]:
    """Where this rank's (TP / expert / FSDP shard of) parameter ``name`` lies in the global one."""
    full, program = _full_shape(trainer, name), trainer.program
    if name in program.experts.params:
        index = program.experts.slices(name, full)
    elif name in program.shards:
        index = program.shards[name].slices(full)
    else:
        index = None
    return chunks(full, index, local_span(p) if fsdp_rows else None)


def _adam_state(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict:
    """torch AdamW's per-parameter state, created as its first step would (zeros, step 0) when the
    parameter has not stepped yet, so a fresh optimizer has every tensor a load fills."""
    state = optimizer.state[p]
    if not state:
        state["step"] = fresh_step(optimizer, p)
        for what in MOMENTS:
            state[what] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def _zero1_views(trainer, gather: bool) -> dict[str, dict[str, torch.Tensor]]:
    """ZeRO-1: name -> {exp_avg, exp_avg_sq (and under bf16 / fp8 the fp32 master):
    parameter-shaped (TP-local) tensors, step}. With ``gather`` they hold the moments all-gathered
    over the flat's DP group (collective); else zeros for a load to fill and `_zero1_scatter` to
    put back."""
    dp, out = trainer.dp, {}
    names = {id(p): n for n, p in dp.named.items()}
    kept = _kept(dp)
    for flat in dp.flats:
        state = dict(_adam_state(dp.optimizer, flat.master), master=flat.master.detach())
        full = {w: (cc.all_gather(state[w], 0, flat.axis) if flat.dp > 1 else state[w]) if gather
                else torch.zeros(flat.size * flat.dp, dtype=flat.dtype, device=flat.device)
                for w in kept}
        offset = 0
        for p in flat.params:
            out[names[id(p)]] = {**{w: full[w][offset:offset + p.numel()].view_as(p) for w in kept},
                                 "step": state["step"].clone() if gather else torch.tensor(0.0)}
            offset += p.numel()
    return out


def _zero1_scatter(trainer, views: dict[str, dict[str, torch.Tensor]]) -> None:
    """Put loaded parameter-shaped moments back into each rank's flat shard; masters from the
    (loaded) parameters."""
    dp = trainer.dp
    names = {id(p): n for n, p in dp.named.items()}
    for flat in dp.flats:
        mine = slice(flat.dp_rank * flat.size, (flat.dp_rank + 1) * flat.size)
        state = _adam_state(dp.optimizer, flat.master)
        with torch.no_grad():
            for w in MOMENTS:
                state[w].copy_(flat.flatten([views[names[id(p)]][w] for p in flat.params])[mine])
            # bf16 / fp8: the saved fp32 master (the bf16 parameters lost its low digits)
            source = [views[names[id(p)]]["master"] if dp.mixed else p.detach() for p in flat.params]
            flat.master.copy_(flat.flatten(source)[mine])
        if flat.params:  # into the optimizer's own counter (fused: on the parameters' device)
            state["step"].copy_(views[names[id(flat.params[0])]]["step"])


def _kept(dp) -> tuple[str, ...]:
    """Optimizer tensors saved per parameter: Adam's moments, and the fp32 main weight where it is
    not the parameter itself (bf16 / fp8 with replicated DP or ZeRO-1)."""
    return MOMENTS + (("master",) if dp.mixed and not isinstance(dp, FullyShard) else ())


def entries(trainer, zero1_views: Optional[dict] = None) -> list[Entry]:
    """This rank's share of the training state as global names, local tensors and chunks."""
    out: list[Entry] = []
    dp = trainer.dp
    for name, p in dp.named.items():
        where = _param_chunks(trainer, name, p)
        out.append((f"model/{name}", local_tensor(p.detach()), where))
        if zero1_views is not None:
            state, where = zero1_views[name], _param_chunks(trainer, name, p, fsdp_rows=False)
        else:
            main = dp.optimizer_param(name)
            state = _adam_state(dp.optimizer, main)
            if main is not p:
                state = dict(state, master=main.detach())
        out += [(f"optim/{name}/{w}", local_tensor(state[w]), where) for w in _kept(dp)]
        out.append((f"optim/{name}/step", state["step"], chunks(())))
    for name, buf in persistent_buffers(trainer).items():
        out.append((f"buffer/{name}", buf, chunks(_full_shape(trainer, name))))
    return out


def _rng_entries(trainer) -> list[Entry]:
    rank, out = trainer.mesh.rank, []
    cpu = torch.get_rng_state()
    out.append((f"rng/rank{rank}/cpu", cpu, chunks(tuple(cpu.shape))))
    if trainer.mesh.device.type == "cuda":
        cuda = torch.cuda.get_rng_state(trainer.mesh.device)
        out.append((f"rng/rank{rank}/cuda", cuda, chunks(tuple(cuda.shape))))
    return out


def _owned(all_entries: list[Entry], rank: int) -> list[tuple[str, Chunk, torch.Tensor]]:
    """The chunks this rank writes: each distinct (tensor, chunk) by the lowest rank holding it."""
    mine = [(name, (c.offset, c.size)) for name, _, cs in all_entries for c in cs]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    first: dict = {}
    for r, listed in enumerate(everyone):
        for key in listed:
            first.setdefault(key, r)
    return [(name, c, t) for name, t, cs in all_entries for c in cs
            if first[(name, (c.offset, c.size))] == rank]


def _shape_of(trainer, name: str, t: torch.Tensor) -> list[int]:
    """The global shape of state tensor ``name`` (``t`` is this rank's piece)."""
    kind, _, rest = name.partition("/")
    if kind == "rng":
        return list(t.shape)
    if kind == "optim":
        base, _, what = rest.rpartition("/")
        return [] if what == "step" else list(_full_shape(trainer, base))
    return list(_full_shape(trainer, rest))


def _shapes(all_entries: list[Entry], trainer) -> dict[str, tuple[list[int], str]]:
    return {name: (_shape_of(trainer, name, t), str(t.dtype).removeprefix("torch."))
            for name, t, _ in all_entries}


# ---- save ---------------------------------------------------------------------------------------
@dataclass
class Pending:
    """A save whose rank files may still be being written (async); `finish` completes it."""

    trainer: object
    root: Path
    step: int
    thread: Optional[object] = None
    result: Optional[tuple[int, str]] = None

    def finish(self) -> Path:
        """Collective: wait for this rank's file, then rank 0 writes the manifest, renames the
        step directory into place and moves ``latest``."""
        if self.thread is not None:
            self.thread.join()
        return finalize(self.root, self.step, self.trainer.mesh.rank, self.result)


def save(trainer, root: str | Path, step: int, total_steps: int, asynchronous: bool = False):
    """Collective: every rank writes its chunks of the state after ``step`` completed steps.
    Synchronous: returns the step directory. Asynchronous: returns a `Pending` once the state is
    copied to CPU memory; its ``finish()`` (collective) completes the checkpoint."""
    root, rank = Path(root), trainer.mesh.rank
    tmp = temp_dir(root, step)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save that died half-way: never resumed from
        tmp.mkdir(parents=True)
    views = _zero1_views(trainer, gather=True) if isinstance(trainer.dp, ZeroOne) else None
    state = entries(trainer, views) + _rng_entries(trainer)
    owned = _owned(state, rank)
    recs = store.records(rank, [(n, c) for n, c, _ in owned])
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (_shapes(state, trainer), recs))
    if rank == 0:
        shapes = {k: v for s, _ in everyone for k, v in s.items()}
        store.write_index(tmp, shapes, [r for _, rs in everyone for r in rs])
        meta = {"version": 2, "step": step, "total_steps": total_steps,
                "job": trainer.job.name, "layout_text": trainer.plan.layout.short(),
                "data": {"next_step": step, "seed": trainer.loader.seed},
                **fingerprints(trainer.job, trainer.plan, total_steps)}
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
    dist.barrier()  # the directory exists for every rank
    pending = Pending(trainer, root, step)
    if not asynchronous:  # training waits: the live tensors are written as they are
        pending.result = _write_or_report(tmp, rank, recs, store.views(owned))
        return pending.finish()
    data = store.snapshot(owned)  # training goes on: the thread writes a copy
    import threading

    def write() -> None:
        pending.result = _write_or_report(tmp, rank, recs, data)
    pending.thread = threading.Thread(target=write, name=f"plait-ckpt-{step}", daemon=True)
    pending.thread.start()
    return pending


def _write_or_report(tmp: Path, rank: int, recs: list[dict], data: list[torch.Tensor]):
    """This rank's file written (size, hash), or None after printing why not: `finalize` then
    raises on every rank instead of leaving the others waiting for this one."""
    try:
        return store.write(tmp, rank, recs, data)
    except Exception as e:  # a full disk, a lost mount, ...: reported, then collective failure
        print(f"rank {rank}: cannot write its checkpoint file in {tmp}: {e}", file=sys.stderr,
              flush=True)
        return None


@dataclass
class Saver:
    """Save every ``every`` steps and after the last one (``Trainer.fit``'s after-step hook);
    with ``asynchronous``, a save finishes at the next one or at `close`."""

    root: str
    every: int = 0
    asynchronous: bool = False
    pending: Optional[Pending] = None
    last: Optional[Path] = None

    def __call__(self, trainer, completed: int, total_steps: int) -> Optional[Path]:
        if completed == total_steps or (self.every > 0 and completed % self.every == 0):
            self.close()
            done = save(trainer, self.root, completed, total_steps, self.asynchronous)
            if isinstance(done, Pending):
                self.pending = done
                return None
            self.last = done
            return done
        return None

    def close(self) -> Optional[Path]:
        if self.pending is not None:
            self.last, self.pending = self.pending.finish(), None
        return self.last


# ---- load ---------------------------------------------------------------------------------------
def load(trainer, path: str | Path) -> int:
    """Collective: restore this rank's state from the checkpoint at ``path`` (written under any
    layout of this model); returns the number of completed steps (the step to run next)."""
    where = find(path)
    meta = read_meta(where)
    check_model(where, meta, trainer.job.model)
    reader = store.Reader(where)
    views = _zero1_views(trainer, gather=False) if isinstance(trainer.dp, ZeroOne) else None
    for name, target, where_chunks in entries(trainer, views):
        reader.fill(name, target, where_chunks)
    if views is not None:
        _zero1_scatter(trainer, views)
    rank = trainer.mesh.rank
    if reader.has(f"rng/rank{rank}/cpu"):
        torch.set_rng_state(_whole(reader, f"rng/rank{rank}/cpu"))
    if trainer.mesh.device.type == "cuda" and reader.has(f"rng/rank{rank}/cuda"):
        torch.cuda.set_rng_state(_whole(reader, f"rng/rank{rank}/cuda"), trainer.mesh.device)
    return int(meta["step"])


def _whole(reader: store.Reader, name: str) -> torch.Tensor:
    shape = reader.shape(name)
    out = torch.empty(shape, dtype=torch.uint8)
    reader.fill(name, out, chunks(tuple(shape)))
    return out
