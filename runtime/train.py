"""The step loop: every rank lowers its own program from (job, plan), then trains it.

    loss averaged over micro-batches and DP; AdamW with warmup + cosine LR; global gradient-norm
    clipping across all groups; logs of loss, tokens/s and memory with a rich progress bar (rank 0).

`python -m plait.runtime.train RUN_DIR` is what each process started by torchrun executes; RUN_DIR
holds job.json and plan.json written by `plait run`.
"""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from plait.ir.errors import PlaitError
from plait.ir.job import Optimizer as OptimizerSpec
from plait.ir.job import TrainJob
from plait.ir.plan import ParallelPlan
from plait.ir.serde import from_json
from plait.lowering import collectives as cc
from plait.lowering.build import build_model
from plait.ir.precision import PrecisionPolicy
from plait.lowering.compile import RankProgram, lower
from plait.lowering.precision import param_dtype

from . import checkpoint
from . import data as data_mod
from .data_blend import blended_loader
from . import device as device_mod
from . import kernels
from . import moe_balance
from . import validation
from .mesh import Mesh, build_mesh, destroy, init_distributed, set_threads
from .optim import adamw, clip_coefficient, lr_at, make_data_parallel, param_groups, set_lr
from .schedule import StepRunner


@dataclass(frozen=True)
class StepLog:
    step: int
    loss: float
    grad_norm: float
    lr: float
    step_time: float
    tokens_per_s: float
    peak_memory_mb: float
    skipped: bool = False  # loss or gradient norm not finite: no update


class NonFiniteStep(PlaitError):
    """More steps with a non-finite loss or gradient norm than the job allows to skip."""


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def keep_local_children(program: RankProgram) -> None:
    """Drop the stage modules this rank does not run (their weights were only needed to lower)."""
    local = {f"stage{c}" for c in program.chunk_indices} | {"loss"}
    for name, _ in list(program.pipe.named_children()):
        if name not in local:
            delattr(program.pipe, name)


def load_sharded_weights(program: RankProgram, path: str, spec,
                         buffers: frozenset = frozenset()) -> list[str]:
    """Fill this rank's parameters, and the persistent buffers named in ``buffers`` (MoE expert
    biases), from a Hugging Face checkpoint, reading only its TP slice of each tensor and only the
    tensors of its own pipeline stages."""
    from plait.lowering.weights import load_hf_weights

    shards, experts = program.shards, program.experts

    def index(name: str, full: tuple[int, ...]):
        if name in experts.params:  # its experts (EP) and their FFN columns (ETP)
            return experts.slices(name, full)
        s = shards.get(name)
        return None if s is None else s.slices(full)  # segmented splits: a list of slices
    targets = dict(program.local_parameters())
    for _, stage in program.local_modules():
        targets.update({n: b for n, b in stage.named_buffers() if n in buffers})
    return load_hf_weights(targets, path, spec, shard=index)


def state_buffer_names(model: torch.nn.Module) -> frozenset:
    """The reference model's persistent buffers (state such as expert biases, not RoPE tables)."""
    params = {n for n, _ in model.named_parameters()}
    return frozenset(k for k in model.state_dict() if k not in params)


def _loader(job: TrainJob, plan: ParallelPlan, mesh: Mesh, source):
    """(the whole dataset or None for a blend, the training loader): a blend of named sources, or
    one dataset (or synthetic tokens) of which training reads all but the validation split."""
    where = dict(dp_rank=mesh.coord("dp"), dp_size=mesh.size("dp"), device=mesh.device)
    if job.data.sources and source is None:
        return None, blended_loader(job, plan.seq_len, plan.global_batch, **where)
    source = source or data_mod.open_source(job.data.path, job.model.vocab,
                                            job.data.synthetic, job.data.seed)
    train = validation.training_part(source, job.data, plan.seq_len)
    return source, data_mod.BatchLoader(train, plan.seq_len, plan.global_batch, job.data.seed,
                                        packing=data_mod.Packing.of(job.data), **where)


def reference_model(job: TrainJob, dtype: torch.dtype) -> torch.nn.Module:
    """The job's reference model: packed documents and the SFT loss mask as its data says."""
    packing = data_mod.Packing.of(job.data)
    return build_model(job.model, dtype=dtype, seed=job.seed, document_mask=packing.document_mask,
                       loss_mask=packing.loss_mask)


class Trainer:
    def __init__(self, job: TrainJob, plan: ParallelPlan, mesh: Mesh,
                 source: Optional[data_mod.TokenSource] = None, weights: Optional[str] = None,
                 dtype: Optional[torch.dtype] = None, model: Optional[torch.nn.Module] = None):
        self.job, self.plan, self.mesh = job, plan, mesh
        self.policy = PrecisionPolicy.of(job)  # the job's precision: dtypes, fp8 layers
        self.policy.check_runnable()
        # the model's dtype; float64 only for numerics checks (tests/runtime parity in fp64)
        self.dtype = dtype if dtype is not None else param_dtype(self.policy)
        self.loss_dtype = torch.promote_types(self.dtype, torch.float32)
        # `model`: a reference module with loaded weights (e.g. a pruned student) to lower instead
        model = model if model is not None else reference_model(job, self.dtype)
        self.program = lower(model, job.model, plan, mesh.rank, precision=self.policy)
        if weights:
            load_sharded_weights(self.program, weights, job.model, state_buffer_names(model))
        keep_local_children(self.program)
        self.program.pipe.to(mesh.device)
        # fused kernels where the hardware and packages allow (no change on CPU / gloo)
        self.kernels = kernels.bind(self.program.pipe, mesh.device.type, fp8=self.policy.kind == "fp8")
        self.stage_modules = [m for _, m in self.program.local_modules()]
        self.dp = make_data_parallel(self.program, mesh, job.optimizer, self.policy)
        self.runner = StepRunner(self.program, mesh, plan.num_microbatches)
        self.source, self.loader = _loader(job, plan, mesh, source)

    def forward_backward(self, step: int, batch: Optional[data_mod.Batch] = None) -> torch.Tensor:
        """Loss of step `step` (or of ``batch``) averaged over micro-batches and DP (on every
        rank), gradients left in place (not yet reduced)."""
        batch = batch if batch is not None else self.loader.local_batch(step)
        packed = {} if batch.positions is None else {"positions": batch.positions}
        if batch.loss_scale != 1.0:  # a loss-masked batch (the distillation runners take neither)
            packed["loss_scale"] = batch.loss_scale
        loss = self.runner.run(batch.tokens, batch.labels, **packed)
        reporter = self.program.holds_loss and self.mesh.coord("tp") == 0
        value = loss.reshape(1).to(self.loss_dtype) if (reporter and loss is not None) \
            else torch.zeros(1, dtype=self.loss_dtype, device=self.mesh.device)
        return cc.all_reduce(value, "sum", "world")[0] / self.mesh.size("dp-cp")  # DP x CP reporters

    def train_step(self, step: int, total_steps: int) -> StepLog:
        start = time.perf_counter()
        self.dp.zero_grad()
        loss = self.forward_backward(step)
        lr = lr_at(step, self.job.optimizer, total_steps)
        self.dp.set_lr(lr)
        finite = math.isfinite(float(loss))
        norm, _ = self.dp.finish_step(finite)
        bad = not (finite and math.isfinite(norm))
        if not bad:  # a skipped step leaves every piece of state as it was
            self.balance_experts()
        elapsed = time.perf_counter() - start
        tokens = self.plan.global_batch * self.plan.seq_len
        return StepLog(step=step, loss=float(loss), grad_norm=norm, lr=lr, step_time=elapsed,
                       tokens_per_s=tokens / elapsed, peak_memory_mb=peak_rss_mb(), skipped=bad)

    def balance_experts(self) -> None:
        """The once-per-step expert-bias update of MoE layers that have one (a no-op otherwise)."""
        moe_balance.update_expert_biases(self.stage_modules, self.job.moe.expert_bias_rate,
                                         moe_balance.token_axes(self.mesh))

    def fit(self, steps: int, on_step: Optional[Callable[[StepLog], None]] = None, start: int = 0,
            after_step: Optional[Callable[["Trainer", int, int], object]] = None) -> list[StepLog]:
        """Steps ``start`` .. ``steps - 1`` of a ``steps``-step run (the LR horizon);
        ``after_step(trainer, completed, steps)`` runs after each (checkpoint.Saver). A step with a
        non-finite loss or gradient norm is skipped (no update); one more than the job's
        ``skip_bad_steps`` raises NonFiniteStep before anything is saved after it."""
        logs, bad = [], 0
        for step in range(start, steps):
            log = self.train_step(step, steps)
            logs.append(log)
            if on_step:
                on_step(log)
            bad += log.skipped
            if log.skipped and bad > self.job.optimizer.skip_bad_steps:
                raise NonFiniteStep(
                    f"step {step}: loss {log.loss} and gradient norm {log.grad_norm}; "
                    f"{bad} non-finite step(s), the job allows skipping "
                    f"{self.job.optimizer.skip_bad_steps}",
                    hint="training stopped before updating; resume from the last checkpoint, "
                         "lower the learning rate or set optimizer skip_bad_steps")
            if after_step:
                after_step(self, step + 1, steps)
        return logs


class ReferenceTrainer:
    """The single-device ground truth: the reference module, torch AdamW with the same parameter
    groups, clip_grad_norm_, the same LR schedule."""

    def __init__(self, model: torch.nn.Module, spec: OptimizerSpec):
        self.model, self.spec = model, spec
        self.optimizer = adamw(param_groups(model.named_parameters(), spec.weight_decay), spec)

    def forward_backward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(tokens, labels)
        loss.backward()
        return loss.detach()

    def step(self, step: int, total_steps: int) -> float:
        # max_norm = inf measures without clipping (grad_clip <= 0 turns clipping off).
        max_norm = self.spec.grad_clip if self.spec.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=False)
        set_lr(self.optimizer, lr_at(step, self.spec, total_steps))
        self.optimizer.step()
        return float(norm)


def run_worker(run_dir: str | Path, console=None) -> int:
    """One torchrun process's training (runtime.worker wraps it with logs and failure records);
    ``console``: where rank 0's progress goes (default: stdout)."""
    run_dir = Path(run_dir)
    job = from_json(TrainJob, (run_dir / "job.json").read_text())
    plan = ParallelPlan.from_json((run_dir / "plan.json").read_text())
    options = json.loads((run_dir / "options.json").read_text())
    timeout_s = options.get("timeout_s") or job.timeout
    set_threads()
    placement = device_mod.activate(device_mod.choose(job.cluster.backend))
    init_distributed(placement.backend, timeout_s)
    mesh = build_mesh(plan.layout, timeout_s, device=placement.device)
    saver = checkpoint.Saver(options["save"], options.get("save_every") or 0,
                             options.get("async_save", False)) if options.get("save") else None
    try:
        return _train(run_dir, job, plan, mesh, options, saver, console)
    except NonFiniteStep as e:  # every rank saw the same all-reduced loss and norm
        kept = (saver.close() if saver else None) or options.get("resume")
        if mesh.rank == 0:
            print(f"error: {e}\n  last good checkpoint: {kept or 'none'}",
                  file=sys.stderr, flush=True)
            (run_dir / STOPPED).write_text(json.dumps({"reason": str(e),
                                                       "last_good": str(kept) if kept else None}))
        return NON_FINITE_EXIT  # every rank: a scheduler (or torchrun) sees the run failed
    finally:
        destroy()


NON_FINITE_EXIT = 3  # what `launch_local` returns when the ranks stopped on a non-finite step
STOPPED = "stopped.json"  # RUN_DIR file: why the ranks stopped early


def _train(run_dir: Path, job: TrainJob, plan: ParallelPlan, mesh: Mesh, options: dict,
           saver, console=None) -> int:
    from .worker import StepHooks, resume_source

    trainer = Trainer(job, plan, mesh, weights=options.get("weights"))
    steps = options.get("steps") or job.steps
    resume = resume_source(options)
    start = checkpoint.load(trainer, resume) if resume else 0
    with StepHooks(trainer, run_dir, options, saver, steps, start, console) as hooks:
        logs = trainer.fit(steps, hooks.on_step, start, hooks.after_step)
    if mesh.rank == 0:
        (run_dir / "log.json").write_text(json.dumps([asdict(l) for l in logs], indent=1))
    if saver is not None:
        saver.close()  # an asynchronous save still in flight completes before the ranks exit
    return 0


if __name__ == "__main__":
    from .worker import main
    sys.exit(main(sys.argv[1]))
