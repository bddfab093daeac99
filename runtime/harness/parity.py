"""Numerics parity: run parallel layouts for a few steps and compare with one device.

For each case, every rank trains its compiled program on the same global batches as the
single-device reference (`ReferenceTrainer`) and records the step-0 loss, the step-0 gradients
(after the TP / DP reductions, before clipping), the parameters after `steps` AdamW steps and the
MoE expert biases. The parent reassembles TP and expert (EP x ETP) shards (`parity_compare`) and
reports the largest difference of each. One process spawn per world size runs all of that size's
cases in sequence (gloo, file:// rendezvous). A case may run in float64 (`Case.dtype`,
`in_fp32_and_fp64`): see `run_parity` for why parameters after Adam steps are compared in float64
only. Dense and MoE models share this one harness.

The reference calls the model once per (DP rank, micro-batch), as the runtime does (`Calls`): for
a dense model that only reorders sums; for MoE it is the semantics itself (each call routes its own
tokens, with its own capacity per sequence-parallel / context-parallel segment and its own aux
loss), and gradients are averaged over the calls.
"""
from __future__ import annotations

import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from plait.ir.cluster import local_cpu
from plait.ir.job import Data, MoEOptions, Optimizer, Precision, TrainJob
from plait.ir.model import ModelSpec
from plait.ir.plan import Layout, ParallelPlan, Stage, even_stages
from plait.lowering.build import build_model

from .. import moe_balance
from ..data import BatchLoader, Packing, SyntheticTokens
from ..mesh import build_mesh, destroy, init_distributed
from ..spawn import start_ranks
from .parity_compare import Errors, compare, placement
from ..train import ReferenceTrainer, Trainer

TIMEOUT_S = 120


@dataclass(frozen=True)
class Case:
    name: str
    layout: Layout
    stages: tuple[Stage, ...] = ()  # default: even_stages
    schedule: str = "1f1b"
    # Each overrides the Setup's field of the same name (one spawn runs cases of several setups:
    # fp32 and fp64 twins, dropless and capacity MoE options, model variants, batch sizes).
    dtype: torch.dtype | None = None
    moe: MoEOptions | None = None
    spec: ModelSpec | None = None
    global_batch: int | None = None
    steps: int | None = None

    def setup(self, setup: "Setup") -> "Setup":
        changes = {k: getattr(self, k) for k in ("dtype", "moe", "spec", "global_batch", "steps")
                   if getattr(self, k) is not None}
        return replace(setup, **changes) if changes else setup

    def plan(self, spec: ModelSpec, global_batch: int, seq: int,
             moe: MoEOptions | None = None) -> ParallelPlan:
        stages = self.stages or even_stages(spec.num_layers, self.layout.pp, self.layout.vpp,
                                            recompute=self.layout.recompute)
        return ParallelPlan(job="parity", model=spec.name, cluster="local-cpu",
                            world=self.layout.world, layout=self.layout, stages=stages,
                            global_batch=global_batch, seq_len=seq, schedule=self.schedule, moe=moe)


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
    moe: MoEOptions = field(default_factory=MoEOptions)  # MoE models: routing (default dropless)
    # None: an fp32 job trained in ``dtype``; bf16 / fp8: the policy decides every dtype
    precision: Precision | None = None
    # Packing: windows cut into documents of about this mean length (0: one per window), the
    # job's document_mask and objective ("sft": ``masked_fraction`` of the labels not counted)
    document_length: int = 0
    document_mask: bool = False
    objective: str = "pretrain"
    masked_fraction: float = 0.0

    @property
    def model_dtype(self) -> torch.dtype | None:
        return self.dtype if self.precision is None else None

    def job(self, world: int) -> TrainJob:
        return TrainJob(name="parity", model=self.spec, cluster=local_cpu(world),
                        global_batch=self.global_batch, seq_len=self.seq, precision=self.precision,
                        optimizer=self.optimizer, moe=self.moe, steps=self.steps,
                        data=Data(synthetic=True, seed=self.seed, document_mask=self.document_mask,
                                  objective=self.objective), seed=self.seed)

    def plan(self, case: Case) -> ParallelPlan:
        return case.plan(self.spec, self.global_batch, self.seq, self.moe)

    def source(self) -> SyntheticTokens:
        return SyntheticTokens(self.spec.vocab, seed=self.seed,
                               document_length=self.document_length,
                               masked_fraction=self.masked_fraction)

    @property
    def packing(self) -> Packing:
        return Packing(document_mask=self.document_mask, loss_mask=self.objective == "sft")


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


@dataclass(frozen=True)
class Calls:
    """How the runtime splits a step's global batch into model calls: ``dp`` ranks x ``micro``
    micro-batches, each call's tokens in ``segments`` capacity segments (the SP / CP ranks that
    route them) in the zigzag order of ``cp`` context-parallel ranks."""
    dp: int = 1
    micro: int = 1
    segments: int = 1
    cp: int = 1

    @staticmethod
    def of(layout: Layout, global_batch: int) -> "Calls":
        return Calls(dp=layout.dp, micro=global_batch // (layout.dp * layout.mbs),
                     segments=(layout.tp if layout.sp else 1) * layout.cp, cp=layout.cp)


@one_thread()
def reference(setup: Setup, calls: Calls = Calls()) -> dict:
    """The single-device run: step-0 loss and gradients, parameters and expert biases after
    ``setup.steps`` steps, the model called as ``calls`` says."""
    torch.manual_seed(0)
    model = build_model(setup.spec, dtype=setup.dtype, seed=setup.seed, moe_options=setup.moe,
                        capacity_segments=calls.segments, capacity_cp=calls.cp,
                        document_mask=setup.packing.document_mask,
                        loss_mask=setup.packing.loss_mask)
    trainer = ReferenceTrainer(model, setup.optimizer)
    out = {}
    for step in range(setup.steps):
        trainer.optimizer.zero_grad(set_to_none=True)
        loss = _reference_step(model, setup, calls, step)
        if step == 0:
            out["loss"] = loss
            out["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        trainer.step(step, setup.steps)
        moe_balance.update_expert_biases([model], setup.moe.expert_bias_rate)  # its load is global
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["biases"] = expert_biases([model])
    return out


def _reference_step(model: torch.nn.Module, setup: Setup, calls: Calls, step: int) -> float:
    """Forward + backward of every (DP rank, micro-batch) call of ``step``, gradients averaged
    over the calls; -> the mean loss."""
    losses = []
    for d in range(calls.dp):
        batch = BatchLoader(setup.source(), setup.seq, setup.global_batch, setup.seed, dp_rank=d,
                            dp_size=calls.dp, packing=setup.packing).local_batch(step)
        positions = batch.positions.chunk(calls.micro) if batch.positions is not None \
            else [None] * calls.micro
        for tokens, labels, pos in zip(batch.tokens.chunk(calls.micro),
                                       batch.labels.chunk(calls.micro), positions):
            loss = model(tokens, labels, pos) * batch.loss_scale
            loss.backward()
            losses.append(float(loss.detach()))
    n = calls.dp * calls.micro
    for p in model.parameters():
        if p.grad is not None:
            p.grad /= n
    return sum(losses) / n


def expert_biases(modules) -> dict[int, torch.Tensor]:
    """Expert bias of every MoE layer, by layer index (module paths differ per program)."""
    out = {}
    for module in modules:
        for path, m in module.named_modules():
            found = re.search(r"(?:^|\.)layers\.(\d+)\.mixer$", path)
            if found and m in moe_balance.bias_blocks([m]):
                out[int(found.group(1))] = m.expert_bias.detach().clone()
    return out


def run_case(setup: Setup, case: Case, rank: int, out_dir: Path) -> None:
    """This rank's part of one case, in an initialised process group: build the case's Trainer
    and record its run (``record_run``)."""
    setup = case.setup(setup)
    plan = setup.plan(case)
    mesh = build_mesh(plan.layout, TIMEOUT_S)
    trainer = Trainer(setup.job(mesh.world), plan, mesh, source=setup.source(),
                      dtype=setup.model_dtype)
    record_run(trainer, setup, case.name, rank, out_dir)


def record_run(trainer: Trainer, setup: Setup, name: str, rank: int, out_dir: Path) -> None:
    """Train ``setup.steps`` steps, saving the step-0 loss and reduced gradients, the final
    parameters and expert biases of this rank, and where its pieces belong, to
    ``{name}.rank{rank}.pt`` (what ``parity_compare.compare`` reads)."""
    trainer.dp.zero_grad()
    loss = trainer.forward_backward(0)
    trainer.dp.reduce()
    grads = trainer.dp.reduced_grads()
    trainer.dp.set_lr(_lr(setup, 0))
    trainer.dp.clip_and_step()
    trainer.balance_experts()  # step 0's end, as in Trainer.train_step
    for step in range(1, setup.steps):
        trainer.train_step(step, setup.steps)
    torch.save({"loss": float(loss), "grads": grads, "params": trainer.dp.full_parameters(),
                "biases": expert_biases(trainer.stage_modules), "tied": trainer.dp.tied,
                **placement(trainer.program, trainer.mesh)},
               out_dir / f"{name}.rank{rank}.pt")


def _lr(setup: Setup, step: int) -> float:
    from ..optim import lr_at
    return lr_at(step, setup.optimizer, setup.steps)


def parity_worker(rank: int, world: int, setup: Setup, cases: list[Case], out_dir: str) -> None:
    """One spawned rank: join the file:// rendezvous in ``out_dir`` and run every case in turn."""
    torch.set_num_threads(1)
    init_distributed("gloo", TIMEOUT_S, f"file://{out_dir}/rendezvous", rank, world)
    try:
        for case in cases:
            run_case(setup, case, rank, Path(out_dir))
    finally:
        destroy()


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
            start_ranks(worker, (world, *args, group, str(work)), world)
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
    records = spawn_cases(parity_worker, cases, out_dir, setup)
    return compare_cases(cases, records, lambda case: reference_key(setup, case),
                         lambda key: reference(*key))


def reference_key(setup: Setup, case: Case) -> tuple[Setup, Calls]:
    """The reference a case compares with: its setup, called as its layout calls the model."""
    setup = case.setup(setup)
    return setup, Calls.of(case.layout, setup.global_batch)


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
