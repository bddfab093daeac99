"""Numerics parity: run parallel layouts for a few steps and compare with one device.

For each case, every rank trains its compiled program on the same global batches as the
single-device reference (`ReferenceTrainer`) and records the step-0 loss, the step-0 gradients
(after the TP / DP reductions, before clipping) and the parameters after `steps` AdamW steps. The
parent reassembles TP shards and reports the largest absolute difference of each. One process
spawn per world size runs all of that size's cases in sequence (gloo, file:// rendezvous). A case
may run in float64 (`Case.dtype`, `in_fp32_and_fp64`): see `run_parity` for why parameters after
Adam steps are compared in float64 only.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.multiprocessing as mp

from plait.ir.cluster import local_cpu
from plait.ir.job import Data, Optimizer, Precision, TrainJob
from plait.ir.model import ModelSpec
from plait.ir.plan import Layout, ParallelPlan, Stage, even_stages
from plait.lowering.build import build_model

from .data import BatchLoader, SyntheticTokens
from .mesh import build_mesh, destroy, init_distributed
from .train import ReferenceTrainer, Trainer

TIMEOUT_S = 120


@dataclass(frozen=True)
class Case:
    name: str
    layout: Layout
    stages: tuple[Stage, ...] = ()  # default: even_stages
    schedule: str = "1f1b"
    dtype: torch.dtype | None = None  # overrides Setup.dtype (one spawn runs fp32 and fp64 cases)

    def setup(self, setup: "Setup") -> "Setup":
        return setup if self.dtype is None else replace(setup, dtype=self.dtype)

    def plan(self, spec: ModelSpec, global_batch: int, seq: int) -> ParallelPlan:
        stages = self.stages or even_stages(spec.num_layers, self.layout.pp, self.layout.vpp,
                                            recompute=self.layout.recompute)
        return ParallelPlan(job="parity", model=spec.name, cluster="local-cpu",
                            world=self.layout.world, layout=self.layout, stages=stages,
                            global_batch=global_batch, seq_len=seq, schedule=self.schedule)


@dataclass(frozen=True)
class Setup:
    spec: ModelSpec
    global_batch: int = 8
    seq: int = 16
    steps: int = 3
    optimizer: Optimizer = field(default_factory=lambda: Optimizer(
        lr=1e-3, min_lr=1e-4, warmup=1, weight_decay=0.1, grad_clip=0.5))
    seed: int = 0
    dtype: torch.dtype = torch.float32  # float64: rounding out of the way (see run_parity)
    # None: an fp32 job trained in ``dtype``; bf16 / fp8: the policy decides every dtype
    precision: Precision | None = None

    @property
    def model_dtype(self) -> torch.dtype | None:
        return self.dtype if self.precision is None else None

    def job(self, world: int) -> TrainJob:
        return TrainJob(name="parity", model=self.spec, cluster=local_cpu(world),
                        global_batch=self.global_batch, seq_len=self.seq, precision=self.precision,
                        optimizer=self.optimizer, steps=self.steps,
                        data=Data(synthetic=True, seed=self.seed), seed=self.seed)

    def source(self) -> SyntheticTokens:
        return SyntheticTokens(self.spec.vocab, seed=self.seed)


@dataclass(frozen=True)
class Errors:
    loss: float
    grads: float
    params: float
    worst_grad: str = ""
    worst_param: str = ""
    copies: float = 0.0  # largest difference between copies of one tensor (tied embeddings)

    @property
    def max(self) -> float:
        return max(self.loss, self.grads, self.params, self.copies)


FP64 = "fp64"  # the name suffix of a case's float64 twin


def in_fp32_and_fp64(cases: list[Case]) -> list[Case]:
    """Each case as it is (``Setup.dtype``) and its float64 twin named "NAME fp64"."""
    return [c for case in cases
            for c in (case, replace(case, name=f"{case.name} {FP64}", dtype=torch.float64))]


@contextmanager
def one_thread():
    """Run a reference on one thread like every rank, so that its rounding does not depend on the
    machine's (or OMP_NUM_THREADS') thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@one_thread()
def reference(setup: Setup) -> dict:
    """The single-device run: step-0 loss and gradients, parameters after ``setup.steps`` steps."""
    torch.manual_seed(0)
    model = build_model(setup.spec, dtype=setup.dtype, seed=setup.seed)
    trainer = ReferenceTrainer(model, setup.optimizer)
    loader = BatchLoader(setup.source(), setup.seq, setup.global_batch, setup.seed)
    out = {}
    for step in range(setup.steps):
        batch = loader.local_batch(step)
        loss = trainer.forward_backward(batch.tokens, batch.labels)
        if step == 0:
            out["loss"] = float(loss)
            out["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        trainer.step(step, setup.steps)
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


def _run_case(setup: Setup, case: Case, rank: int, out_dir: Path) -> None:
    setup = case.setup(setup)
    plan = case.plan(setup.spec, setup.global_batch, setup.seq)
    mesh = build_mesh(plan.layout, TIMEOUT_S)
    trainer = Trainer(setup.job(mesh.world), plan, mesh, source=setup.source(), dtype=setup.model_dtype)
    record_run(trainer, setup, case.name, rank, out_dir)


def record_run(trainer: Trainer, setup: Setup, name: str, rank: int, out_dir: Path) -> None:
    """Train ``setup.steps`` steps, saving the step-0 loss and reduced gradients and the final
    parameters of this rank to ``{name}.rank{rank}.pt`` (what ``compare`` reads)."""
    trainer.dp.zero_grad()
    loss = trainer.forward_backward(0)
    trainer.dp.reduce()
    grads = trainer.dp.reduced_grads()
    trainer.dp.set_lr(_lr(setup, 0))
    trainer.dp.clip_and_step()
    for step in range(1, setup.steps):
        trainer.train_step(step, setup.steps)
    shards = dict(trainer.program.shards)  # name -> ShardSpec
    coords = dict(trainer.program.coords, edp=trainer.mesh.coord("edp"))
    torch.save({"loss": float(loss), "grads": grads, "params": trainer.dp.full_parameters(),
                "shards": shards, "coords": coords, "tied": trainer.dp.tied,
                "experts": trainer.program.experts},
               out_dir / f"{name}.rank{rank}.pt")


def _lr(setup: Setup, step: int) -> float:
    from .optim import lr_at
    return lr_at(step, setup.optimizer, setup.steps)


def _worker(rank: int, world: int, setup: Setup, cases: list[Case], out_dir: str) -> None:
    torch.set_num_threads(1)
    init_distributed("gloo", TIMEOUT_S, f"file://{out_dir}/rendezvous", rank, world)
    try:
        for case in cases:
            _run_case(setup, case, rank, Path(out_dir))
    finally:
        destroy()


def assemble(records: list[dict], key: str) -> dict[str, torch.Tensor]:
    """Whole tensors from the DP-rank-0 records: TP shards reassembled in index order (by their
    ShardSpec, which knows segmented splits such as Mamba's in_proj); expert weights from the
    EDP-rank-0 records, one piece per (ep, etp) coordinate."""
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    experts: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
    specs, syncs = {}, {}
    for rec in records:
        sync = rec.get("experts")
        for name, tensor in rec[key].items():
            if sync is not None and name in sync.params:
                if rec["coords"]["edp"] == 0:
                    experts.setdefault(name, {})[(sync.grid.ep_rank, sync.grid.etp_rank)] = tensor
                    syncs[name] = sync
            elif rec["coords"]["dp"] == 0:
                spec = rec["shards"].get(name)
                pieces.setdefault(name, {})[spec.index if spec else 0] = tensor
                specs[name] = spec
    whole = {n: specs[n].assemble([p[i] for i in sorted(p)]) if specs[n] else p[0]
             for n, p in pieces.items()}
    whole.update({n: syncs[n].assemble(n, p) for n, p in experts.items()})
    return whole


def _copy_diff(records: list[dict], key: str) -> float:
    """The first and last stage's copies of a tied embedding (each TP piece) must agree."""
    seen: dict[tuple[str, int], torch.Tensor] = {}
    worst = 0.0
    for rec in records:
        for name in rec.get("tied", ()):
            tensor = rec[key][name]
            spec = rec["shards"].get(name)
            piece = (name, spec.index if spec else 0)
            if piece in seen:
                worst = max(worst, (seen[piece] - tensor).abs().max().item())
            seen.setdefault(piece, tensor)
    return worst


def _max_diff(got: dict, want: dict) -> tuple[float, str]:
    missing = sorted(set(want) - set(got))
    if missing:
        raise AssertionError(f"parameters missing from the parallel run: {missing}")
    worst = max(want, key=lambda n: (got[n] - want[n]).abs().max().item())
    return (got[worst] - want[worst]).abs().max().item(), worst


def compare(records: list[dict], ref: dict) -> Errors:
    losses = [r["loss"] for r in records]
    grad_err, worst = _max_diff(assemble(records, "grads"), ref["grads"])
    param_err, worst_param = _max_diff(assemble(records, "params"), ref["params"])
    return Errors(loss=max(abs(l - ref["loss"]) for l in losses), grads=grad_err,
                  params=param_err, worst_grad=worst, worst_param=worst_param,
                  copies=max(_copy_diff(records, "params"), _copy_diff(records, "grads")))


def spawn_cases(worker, cases: list[Case], out_dir: str | None, *args) -> dict[str, list[dict]]:
    """One spawn per world size of ``worker(rank, world, *args, cases, work_dir)``; returns each
    case's per-rank records (the ``{case}.rank{r}.pt`` files the worker wrote)."""
    records: dict[str, list[dict]] = {}
    by_world: dict[int, list[Case]] = {}
    for case in cases:
        by_world.setdefault(case.layout.world, []).append(case)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        for world, group in sorted(by_world.items()):
            work = Path(tmp) / f"world{world}"
            work.mkdir()
            mp.spawn(worker, args=(world, *args, group, str(work)), nprocs=world, join=True)
            for case in group:
                records[case.name] = [torch.load(work / f"{case.name}.rank{r}.pt",
                                                 weights_only=False) for r in range(world)]
    return records


def run_parity(setup: Setup, cases: list[Case], out_dir: str | None = None) -> dict[str, Errors]:
    """Spawn one group of processes per world size; returns each case's errors.

    In float32 the loss and the step-0 gradients are the meaningful comparison (~1e-7 apart: sums
    reordered by the layout). Parameters after AdamW steps are not: Adam's update lr * m / (sqrt(v)
    + eps) is nearly scale-free, so an entry with a tiny gradient moves by ~lr whatever its size,
    and 1e-9 rounding differences of such a gradient shift its moves by up to ~1e-5 (more with the
    thread count of the reference). A case in float64 (``Case.dtype`` / ``Setup.dtype``; every
    DP kind) takes rounding out of the way: the whole step then agrees to ~1e-14."""
    records = spawn_cases(_worker, cases, out_dir, setup)
    return compare_cases(cases, records, lambda case: case.setup(setup), reference)


def compare_cases(cases: list[Case], records: dict[str, list[dict]], setup_of: Callable,
                  reference_of: Callable) -> dict[str, Errors]:
    """Each case's errors against the reference run of its own setup (computed once per distinct
    setup: every float32 case shares one, every float64 twin another)."""
    refs: dict = {}
    out = {}
    for case in cases:
        setup = setup_of(case)
        if setup not in refs:
            refs[setup] = reference_of(setup)
        out[case.name] = compare(records[case.name], refs[setup])
    return out
