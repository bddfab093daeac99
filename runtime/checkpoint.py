"""Training checkpoints with torch.distributed.checkpoint (DCP): save every N steps, resume exactly.

    SAVE_DIR/step-000004/   DCP files (.metadata, __<rank>_0.distcp) + plait.json (what wrote it)
    SAVE_DIR/latest         the newest complete step directory's name

Every rank contributes its own state; DCP writes in parallel and keeps one copy of tensors that
several ranks hold under the same key. Keys say what makes a tensor unique:

    model/<name>[@tp<i>|@ep<e>.etp<t>]    parameters (TP pieces and expert shards tagged; DP
                                          replicas and the tied-embedding copies share a key)
    buffer/<name>                         persistent buffers (MoE expert biases: the same on
                                          every rank of a stage)
    optim/<param key>/<state>             AdamW state (replicated: per parameter; FSDP: DTensor
                                          shards, DCP records their offsets)
    optim/zero1/rank<r>/flat<k>/<state>   ZeRO-1: the rank's master shard and its AdamW state
    rng/rank<r>/{cpu,cuda}                each rank's generators
    trainer                               completed steps, LR horizon, data position

The LR schedule and the data order are functions of the step (and the job's seeds), so the step is
their whole state. A checkpoint resumes only under the layout that wrote it (same shards); anything
else is refused with the path and both layouts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from plait.ir.errors import PlaitError
from plait.ir.plan import ParallelPlan
from plait.ir.serde import to_dict

from .optim import DataParallel
from .zero1 import ZeroOne

META = "plait.json"
LATEST = "latest"
VERSION = 1
# Layout fields that decide which tensors a rank holds (sp, mbs, recompute and schedule do not).
STATE_FIELDS = ("tp", "cp", "dp", "pp", "vpp", "ep", "etp", "edp", "dp_kind")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def state_signature(plan: ParallelPlan, model) -> dict:
    """What must match for a checkpoint to load: the model, the state-bearing layout, the stages."""
    layout = {k: getattr(plan.layout, k) for k in STATE_FIELDS}
    stages = [[s.first, s.last] for s in sorted(plan.stages, key=lambda s: s.first)]
    signature = {"model": to_dict(model), "layout": layout, "stages": stages, "world": plan.world}
    return json.loads(json.dumps(signature))  # as plait.json will read back (lists, not tuples)


# ---- state dict ---------------------------------------------------------------------------------
def param_key(trainer, name: str) -> str:
    program, mesh = trainer.program, trainer.mesh
    if name in program.shards:
        return f"{name}@tp{program.shards[name].index}"
    if name in program.experts.params:
        return f"{name}@ep{mesh.coord('ep')}.etp{mesh.coord('etp')}"
    return name


def persistent_buffers(trainer) -> dict[str, torch.Tensor]:
    """The local stages' buffers that are state (not RoPE tables and other derived ones)."""
    out = {}
    for _, stage in trainer.program.local_modules():
        for name, buf in stage.named_buffers():
            owner, _, leaf = name.rpartition(".")
            if leaf not in stage.get_submodule(owner)._non_persistent_buffers_set:
                out[name] = buf
    return out


def _adam_state(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict:
    """torch AdamW's per-parameter state, created as its first step would (zeros, step 0) when the
    parameter has not stepped yet, so a fresh optimizer has every tensor DCP loads into."""
    state = optimizer.state[p]
    if not state:
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def _optimizer_state(dp: DataParallel, rank: int, keys: dict[str, str]) -> dict:
    out = {}
    if isinstance(dp, ZeroOne):
        for k, flat in enumerate(dp.flats):
            prefix = f"optim/zero1/rank{rank}/flat{k}"
            out[f"{prefix}/master"] = flat.master.detach()
            for what, value in _adam_state(dp.optimizer, flat.master).items():
                out[f"{prefix}/{what}"] = value
        return out
    for name, p in dp.named.items():
        main = dp.optimizer_param(name)
        if main is not p:  # bf16 / fp8: the fp32 main weight AdamW steps, and its state
            out[f"optim/{keys[name]}/master"] = main.detach()
        for what, value in _adam_state(dp.optimizer, main).items():
            out[f"optim/{keys[name]}/{what}"] = value
    return out


def state_dict(trainer, step: int, total_steps: int) -> dict:
    """This rank's share of the training state, tensors by reference (DCP loads in place)."""
    rank = trainer.mesh.rank
    keys = {name: param_key(trainer, name) for name in trainer.dp.named}
    out = {f"model/{keys[n]}": p.detach() for n, p in trainer.dp.named.items()}
    out.update({f"buffer/{n}": b for n, b in persistent_buffers(trainer).items()})
    out.update(_optimizer_state(trainer.dp, rank, keys))
    out[f"rng/rank{rank}/cpu"] = torch.get_rng_state()
    if trainer.mesh.device.type == "cuda":
        out[f"rng/rank{rank}/cuda"] = torch.cuda.get_rng_state(trainer.mesh.device)
    out["trainer"] = {"step": step, "total_steps": total_steps}
    return out


# ---- save ---------------------------------------------------------------------------------------
def save(trainer, root: str | Path, step: int, total_steps: int) -> Path:
    """Collective: every rank writes its state for completed step ``step``; rank 0 then writes
    plait.json and points ``latest`` at it."""
    target = step_dir(root, step)
    dcp.save(state_dict(trainer, step, total_steps), checkpoint_id=str(target))
    if trainer.mesh.rank == 0:
        meta = {"version": VERSION, "step": step, "total_steps": total_steps,
                "job": trainer.job.name, "layout_text": trainer.plan.layout.short(),
                "data": _data_position(trainer, step),
                **state_signature(trainer.plan, trainer.job.model)}
        (target / META).write_text(json.dumps(meta, indent=1) + "\n")
        (Path(root) / LATEST).write_text(target.name + "\n")
    dist.barrier()
    return target


def _data_position(trainer, step: int) -> dict:
    loader = trainer.loader
    return {"next_step": step, "seed": loader.seed, "global_batch": loader.global_batch,
            "seq_len": loader.seq_len}


@dataclass
class Saver:
    """Save every ``every`` steps and after the last one (``Trainer.fit``'s after-step hook)."""

    root: str
    every: int = 0

    def __call__(self, trainer, completed: int, total_steps: int) -> Optional[Path]:
        if completed == total_steps or (self.every > 0 and completed % self.every == 0):
            return save(trainer, self.root, completed, total_steps)
        return None


# ---- find, check, load --------------------------------------------------------------------------
def find(path: str | Path) -> Path:
    """The checkpoint at ``path``: a step directory itself, else the one ``latest`` names, else
    the newest step directory inside; PlaitError naming the path when there is none."""
    root = Path(path)
    if (root / ".metadata").is_file():
        return root
    if not root.is_dir():
        raise PlaitError(f"no checkpoint at {root}: the directory does not exist")
    latest = root / LATEST
    if latest.is_file():
        chosen = root / latest.read_text().strip()
        if (chosen / ".metadata").is_file():
            return chosen
        raise PlaitError(f"{latest} names {chosen}, which holds no complete checkpoint")
    steps = sorted(p for p in root.glob("step-*") if (p / ".metadata").is_file())
    if not steps:
        raise PlaitError(f"no checkpoint in {root} (expected step-NNNNNN/ directories written by "
                         "`plait run --save`)")
    return steps[-1]


def read_meta(path: Path) -> dict:
    meta_file = path / META
    if not meta_file.is_file():
        raise PlaitError(f"checkpoint {path} has no {META}; it was not written by plait")
    return json.loads(meta_file.read_text())


def check_compatible(path: str | Path, plan: ParallelPlan, model) -> dict:
    """The checkpoint's metadata if this plan and model can load it; else PlaitError saying what
    differs, naming the path."""
    where = find(path)
    meta = read_meta(where)
    want = state_signature(plan, model)
    if meta.get("model") != want["model"]:
        raise PlaitError(f"checkpoint {where} holds model {meta.get('model', {}).get('name')!r} "
                         f"with another shape than this job's {model.name!r}")
    differ = [f"{k} {meta.get('layout', {}).get(k)} there, {v} here"
              for k, v in want["layout"].items() if meta.get("layout", {}).get(k) != v]
    differ += [f"{k} {meta.get(k)} there, {want[k]} here" for k in ("stages", "world")
               if meta.get(k) != want[k]]
    if differ:
        raise PlaitError(f"checkpoint {where} was written by layout {meta.get('layout_text')}: "
                         + "; ".join(differ),
                         hint="resume with the plan that wrote it (--plan), or start afresh")
    return meta


def load(trainer, path: str | Path) -> int:
    """Collective: restore this rank's state from the checkpoint at ``path``; returns the number
    of completed steps (the step to run next)."""
    where = find(path)
    check_compatible(where, trainer.plan, trainer.job.model)
    state = state_dict(trainer, 0, 0)
    dcp.load(state, checkpoint_id=str(where))
    rank = trainer.mesh.rank
    torch.set_rng_state(state[f"rng/rank{rank}/cpu"])
    if trainer.mesh.device.type == "cuda":
        torch.cuda.set_rng_state(state[f"rng/rank{rank}/cuda"], trainer.mesh.device)
    return int(state["trainer"]["step"])
