"""Gradient reduction, global-norm clipping and AdamW for the three data-parallel kinds.

  replicated  every DP rank keeps full AdamW state; gradients are all-reduced (averaged) over DP
  zero1       distributed optimizer: gradients are reduce-scattered into flat per-rank shards, each
              DP rank runs AdamW on its shard only, updated shards are all-gathered back
  fsdp        torch's fully_shard (FSDP2) over the DP group shards parameters, gradients and state

All use torch.optim.AdamW for the arithmetic, built (runtime/adamw.py) as ir/counts/optimizer.py
adamw_path says for the parameters' device (torch's fused kernel on CPU and CUDA, FSDP2's DTensor
shards included): the same choice the cost model's optimizer_bytes is priced from. Under a mixed
precision policy (bf16 / fp8) the model's parameters are bf16 while gradients accumulate and reduce
in fp32 main-gradient buffers (runtime/main_grads.py) and AdamW steps fp32 main weights: full
copies (replicated), the flat fp32 shards (zero1, runtime/zero1.py), or FSDP2's fp32 sharded
parameters with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) (fsdp). Gradients listed
in the program's grad_sync.tp_sum are summed over TP first (replicated weights used in TP /
sequence-parallel regions). The global gradient norm counts every parameter element exactly once
across all groups: TP-replicated ones on TP rank 0, DP-replicated ones on DP rank 0, shards on
their owners, then one all-reduce over the world.

Expert weights (MoE layers, `program.experts`) are sharded over EP x ETP and replicated over EDP
only: their gradients are summed over the EDP group and divided by dp * cp like every other gradient
(Megatron-Core's DDP), their ZeRO-1 shards split over EDP, and their norm counts on EDP rank 0.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from plait.ir.job import Optimizer as OptimizerSpec
from plait.ir.precision import PrecisionPolicy
from plait.lowering import collectives as cc
from plait.lowering.compile import RankProgram
from plait.lowering.precision import main_dtype, reduce_dtype

# the AdamW itself, its groups and schedule; importers of these names from here keep working
from .adamw import adamw, lr_at, param_groups, set_lr  # noqa: F401
from .main_grads import MainGrads, masters_of, own_buffers, publish
from .mesh import EMBEDDING_AXIS, Mesh

# Dense gradients are averaged over DP x CP: context-parallel ranks hold different tokens of the same
# sequences, each with its local mean loss (equal token counts), exactly like data-parallel replicas.
# Without CP the "dp-cp" group is the DP group.
GRAD_AXIS = "dp-cp"
EXPERT_AXIS = "edp"  # the replica group of expert weights


def accumulator_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    """float32 for reductions and optimizer masters, float64 when the parameters are float64 (the
    parity checks run whole steps in float64 to take rounding out of the comparison)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def all_reduce_flat(grads: list[torch.Tensor], axis: str | None, divisor: int = 1) -> None:
    """Sum ``grads`` over ``axis`` (None: no reduction) as one flat buffer, divide by
    ``divisor``, and write the results back in place."""
    flat = torch.cat([g.flatten() for g in grads])
    if axis is not None:
        flat = cc.all_reduce(flat, "sum", axis)
    if divisor != 1:
        flat = flat / divisor
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def squared_norm(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The sum of ``g``'s squares in ``dtype``, in one read of ``g`` (torch's vector norm, squared:
    within two roundings of the sum; g.pow(2).sum() wrote and re-read a square as large as g)."""
    return torch.linalg.vector_norm(g, dtype=dtype).square()


def scale(grads: list[torch.Tensor], coef: torch.Tensor) -> None:
    """Multiply every gradient by the clip factor in place: one foreach kernel per device and
    dtype, element for element what a mul_ per tensor computes."""
    if grads:
        torch._foreach_mul_(grads, coef.to(grads[0].device))


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_'s factor."""
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


class DataParallel:
    """Base: this rank's parameters, TP sums, norm ownership. Subclasses reduce over DP and step."""

    def __init__(self, program: RankProgram, mesh: Mesh, spec: OptimizerSpec,
                 policy: PrecisionPolicy | None = None):
        self.program, self.mesh, self.spec = program, mesh, spec
        self.policy = policy or PrecisionPolicy("fp32", 0)
        self.mixed = self.policy.mixed
        self.main: MainGrads | None = None  # fp32 main gradients (replicated / zero1 under bf16)
        self.named = program.local_parameters()
        self.acc_dtype = accumulator_dtype(self.named.values())
        self.tp_sum = [n for n in program.grad_sync.tp_sum if n in self.named]
        self.dp = mesh.size(GRAD_AXIS)  # every gradient is divided by dp * cp ...
        experts = set(program.experts.params)
        # ... after a sum over the group its parameter is replicated on
        self.axis_of = {n: EXPERT_AXIS if n in experts else GRAD_AXIS for n in self.named}
        # the last stage's copy of a tied embedding: summed with the first stage's, counted there
        self.tied = [n for n in program.grad_sync.embedding_sum if n in self.named]
        self.tied_copy = set(self.tied) if mesh.coord("pp") != 0 else set()

    def wrap(self, modules: list[nn.Module]) -> None:
        """Hook the stage modules before the pipeline is built (FSDP shards them here)."""

    def grad(self, name: str):
        """This rank's accumulated gradient of ``name`` (the fp32 main gradient under bf16 / fp8);
        None when the parameter took no part in the loss."""
        if self.main is not None:
            return self.main.get(name)
        return self._local_grad(self.named[name])

    def sum_over_tp(self) -> None:
        """One all-reduce of all TP-partial gradients together (not one per parameter: under
        sequence parallelism every norm weight has one, and each collective costs a round trip)."""
        grads = [g for g in (self.grad(n) for n in self.tp_sum) if g is not None]
        if grads:
            all_reduce_flat(grads, "tp")

    def _local_grad(self, p: torch.Tensor):
        g = p.grad
        return g.to_local() if hasattr(g, "to_local") else g

    def sum_over_embedding_group(self) -> None:
        """Both copies of a tied embedding get the sum of their gradients (FSDP: of the local
        shards, which line up: same shape, same DP coordinate)."""
        for name in self.tied:
            p = self.named[name]
            if self.main is not None:
                grad = self.main.ensure(name)
            else:
                if p.grad is None:  # this copy took no part in the loss; its peer still waits
                    p.grad = torch.zeros_like(p)
                grad = self._local_grad(p)
            grad.copy_(cc.all_reduce(grad, "sum", EMBEDDING_AXIS))

    def _norm_owned(self, name: str) -> bool:
        """Does this rank count ``name``'s gradient in the global norm (TP-replicated ones on TP
        rank 0; a tied embedding on the first stage only)?"""
        if name in self.tied_copy:
            return False
        return (name in self.program.shards or self.axis_of[name] == EXPERT_AXIS
                or self.mesh.coord("tp") == 0)

    def by_axis(self, names: Iterable[str]) -> list[tuple[str, list[str]]]:
        """``names`` split by the axis their gradients are summed over (dense first)."""
        names = list(names)
        return [(axis, [n for n in names if self.axis_of[n] == axis])
                for axis in (GRAD_AXIS, EXPERT_AXIS) if any(self.axis_of[n] == axis for n in names)]

    def global_norm(self) -> torch.Tensor:
        local = self.owned_sq_sum().reshape(1)
        return cc.all_reduce(local, "sum", "world").sqrt()[0]

    def reduce(self) -> None:
        """Complete every gradient: sum over TP where partial and over the embedding group where
        tied, average over DP."""
        self.sum_over_tp()
        self.sum_over_embedding_group()
        self.reduce_over_dp()

    def finish_step(self, finite_loss: bool = True) -> tuple[float, float]:
        """Reduce gradients, clip by the global norm, step; returns (grad norm, clip factor)."""
        self.reduce()
        return self.clip_and_step(finite_loss)

    def clip_and_step(self, finite_loss: bool = True) -> tuple[float, float]:
        """As above; a non-finite loss or norm (the same on every rank: both are all-reduced)
        leaves the parameters and optimizer state untouched and returns factor 0."""
        norm = self.global_norm()
        if not (finite_loss and math.isfinite(float(norm))):
            return float(norm), 0.0
        coef = clip_coefficient(norm, self.spec.grad_clip) if self.spec.grad_clip > 0 \
            else torch.tensor(1.0)
        self.step(coef)
        return float(norm), float(coef)

    def zero_grad(self) -> None:
        for p in self.named.values():
            p.grad = None
        if self.main is not None:
            self.main.zero()

    def optimizer_param(self, name: str) -> torch.Tensor:
        """The tensor AdamW steps for parameter ``name`` (its fp32 main weight under bf16 / fp8
        with replicated DP; the parameter itself otherwise; ZeRO-1 steps flat shards)."""
        return self.named[name]

    def state_tensors(self) -> dict[str, list[torch.Tensor]]:
        """The tensors this rank holds per class (ir/counts STATE_CLASSES), for memory truth."""
        state = self.optimizer.state
        return {"weights": list(self.named.values()),
                "grads": [self.grad(n) for n in self.named],
                "master": [], "master_grads": [],
                "moments": [s[k] for s in state.values() for k in ("exp_avg", "exp_avg_sq") if k in s]}

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """name -> this rank's (TP-local) parameter, whole along DP (for tests, checkpoints)."""
        return {n: p.detach().clone() for n, p in self.named.items()}

    # subclass API
    def reduce_over_dp(self) -> None: ...
    def owned_sq_sum(self) -> torch.Tensor: ...
    def step(self, coef: torch.Tensor) -> None: ...
    def set_lr(self, lr: float) -> None: ...
    def reduced_grads(self) -> dict[str, torch.Tensor]:
        """name -> this rank's (TP-local) gradient averaged over DP, full along DP (for tests)."""
        ...


class Replicated(DataParallel):
    """Plain data parallelism: one flat all-reduce of all gradients, full AdamW everywhere."""

    def __init__(self, program, mesh, spec, policy=None):
        super().__init__(program, mesh, spec, policy)
        self.masters = self.named  # fp32: the optimizer steps the model's own parameters
        if self.mixed:
            self.main = MainGrads(self.named, own_buffers(self.named, reduce_dtype(self.policy)),
                                  1.0 / program.plan.num_microbatches)
            self.masters = masters_of(self.named, main_dtype(self.policy))
        self.optimizer = adamw(param_groups(self.masters.items(), spec.weight_decay), spec)

    def reduce_over_dp(self) -> None:
        with_grad = [n for n in self.named if self.grad(n) is not None]
        for axis, names in self.by_axis(with_grad):
            grads = [self.grad(n) for n in names]
            if self.dp == 1 and self.mesh.size(axis) == 1:
                continue
            all_reduce_flat(grads, axis if self.mesh.size(axis) > 1 else None, self.dp)

    def owned_sq_sum(self) -> torch.Tensor:
        total = torch.zeros((), dtype=self.acc_dtype, device=self.mesh.device)
        for name in self.named:
            grad = self.grad(name)
            if grad is not None and self.mesh.coord(self.axis_of[name]) == 0 \
                    and self._norm_owned(name):
                total += squared_norm(grad, self.acc_dtype)
        return total

    def step(self, coef: torch.Tensor) -> None:
        grads = []
        for name, master in self.masters.items():
            grad = self.grad(name)
            if grad is not None:
                grads.append(grad)
            if self.mixed:
                master.grad = grad  # the fp32 main gradient itself, no copy
        scale(grads, coef)
        self.optimizer.step()
        if self.mixed:
            publish(self.masters, self.named)

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def reduced_grads(self) -> dict[str, torch.Tensor]:
        return {n: self.grad(n).detach().clone() for n in self.named if self.grad(n) is not None}

    def optimizer_param(self, name: str) -> torch.Tensor:
        return self.masters[name]

    def state_tensors(self) -> dict[str, list[torch.Tensor]]:
        out = super().state_tensors()
        if self.mixed:
            out["master"] = list(self.masters.values())
        return out


def make_data_parallel(program: RankProgram, mesh: Mesh, spec: OptimizerSpec,
                       policy: PrecisionPolicy | None = None) -> DataParallel:
    from .fsdp import FullyShard  # they build on DataParallel above
    from .zero1 import ZeroOne

    strategies = {"replicated": Replicated, "zero1": ZeroOne, "fsdp": FullyShard}
    return strategies[program.grad_sync.dp_kind](program, mesh, spec, policy)
