"""FSDP2 (torch's fully_shard) as plait's third data-parallel kind (see runtime/optim.py for the
common parts): one unit per model unit, the embedding and the head units of their own, the stage
(FSDP's root) for the rest, as the memory and cost models price it (planner/cost/pipeline.py,
planner/cost/memory.py fsdp_buffers)."""
from __future__ import annotations

import torch
from torch import nn

from plait.ir import counts
from plait.ir.errors import LayoutError
from plait.ir.precision import PrecisionPolicy
from plait.lowering.precision import main_dtype, param_dtype, reduce_dtype

from .optim import (EXPERT_AXIS, GRAD_AXIS, DataParallel, adamw, param_groups, scale, set_lr,
                    squared_norm)


def _even_shard(shards: int):
    """FSDP2's placement of each parameter: the first dim that divides by ``shards``
    (counts.fsdp_shard_dim, which the memory model reads too), so a grouped expert tensor with
    fewer local experts than ranks splits its ffn rows instead of padding whole experts."""
    from torch.distributed.tensor import Shard

    return lambda p: Shard(counts.fsdp_shard_dim(tuple(p.shape), shards))


class FullyShard(DataParallel):
    """FSDP2 (torch fully_shard) over the DP group, as the memory and cost models price it: one unit
    per model unit (the lowering's FSDP groups of layer modules: a transformer layer), the
    embedding and the head units of their own, the stage for the rest (final norm); each unit
    gathered just before it runs with the next one prefetched, resharded after, and its gradients
    reduce-scattered every micro-batch (runtime/schedule.py). gloo has neither AVG nor
    PREMUL_SUM, so reductions are forced to SUM with a post-division by dp."""

    def __init__(self, program, mesh, spec, policy=None):
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if program.experts.params and mesh.members[EXPERT_AXIS] != mesh.members[GRAD_AXIS]:
            raise LayoutError("fsdp shards every weight over dp x cp, but expert weights replicate "
                              f"over edp = {mesh.size(EXPERT_AXIS)} ranks only",
                              hint="use dp_kind = zero1 (or replicated) with expert parallelism")
        dp_mesh = DeviceMesh.from_group(mesh.groups[GRAD_AXIS], mesh.device.type,
                                        mesh_dim_names=("dp-cp",))
        policy = policy or PrecisionPolicy("fp32", 0)
        mp = MixedPrecisionPolicy()
        if policy.mixed:  # FSDP keeps the fp32 shards (the main weights) and casts for compute
            mp = MixedPrecisionPolicy(param_dtype=param_dtype(policy), reduce_dtype=reduce_dtype(policy))
        self.units: list[list[nn.Module]] = []  # per stage, in forward order; the stage last
        for _, module in program.local_modules():
            if policy.mixed:
                module.to(main_dtype(policy))
            self.units.append(shard_stage(module, dict(
                mesh=dp_mesh, mp_policy=mp, shard_placement_fn=_even_shard(dp_mesh.size()))))
        super().__init__(program, mesh, spec, policy)  # parameters are DTensors now
        self.optimizer = adamw(param_groups(self.named.items(), spec.weight_decay), spec)

    def reduce_over_dp(self) -> None:
        """FSDP has reduce-scattered during backward already."""

    def owned_sq_sum(self) -> torch.Tensor:
        total = torch.zeros((), dtype=self.acc_dtype, device=self.mesh.device)
        for name, p in self.named.items():
            g = self._local_grad(p)
            if g is not None and self._norm_owned(name):
                total += squared_norm(g, self.acc_dtype)
        return total

    def step(self, coef: torch.Tensor) -> None:
        scale([g for g in (self._local_grad(p) for p in self.named.values()) if g is not None],
              coef)
        self.optimizer.step()

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def reduced_grads(self) -> dict[str, torch.Tensor]:
        return {n: p.grad.full_tensor().detach().clone() for n, p in self.named.items()
                if p.grad is not None}

    def full_parameters(self) -> dict[str, torch.Tensor]:
        return {n: p.full_tensor().detach().clone() for n, p in self.named.items()}

    def state_tensors(self) -> dict[str, list[torch.Tensor]]:
        out = super().state_tensors()
        if self.mixed:  # the fp32 shards are the main weights; bf16 copies live only gathered
            out["master"], out["weights"] = out["weights"], []
        return out


def stage_units(stage: nn.Module) -> list[list[nn.Module]]:
    """The FSDP units of one stage in forward order, each a list of modules its forward runs:
    the embedding, each of the lowering's layer groups, the head, where the stage's graph calls
    them. A module sharing a parameter with another unit (a tied head on a single stage) stays
    with the stage."""
    from plait.lowering.passes.recompute import FSDP_GROUPS, layer_modules

    layers = layer_modules(stage)
    groups = [[layers[i] for i in group] for group in stage.meta.get(FSDP_GROUPS, ())]
    called = [n.target for n in stage.graph.nodes if n.op == "call_module"]
    embed, head = ([[stage.get_submodule(name)]] if name in called else [] for name in ("embed", "head"))
    candidates = embed + groups + head
    owners: dict[int, int] = {}
    for k, unit in enumerate(candidates):
        for m in unit:
            for p in m.parameters():
                owners[id(p)] = k if owners.get(id(p), k) == k else -1
    return [u for k, u in enumerate(candidates)
            if all(owners[id(p)] == k for m in u for p in m.parameters())]


def shard_stage(stage: nn.Module, options: dict) -> list[nn.Module]:
    """fully_shard each unit of ``stage`` (stage_units), then the stage over what is left; each
    unit prefetches the next one's all-gather in forward and the previous one's in backward.
    Returns one module per unit and the stage last."""
    from torch.distributed.fsdp import fully_shard

    units = stage_units(stage)
    taken: set[nn.Parameter] = set()
    heads = []
    for unit in units:  # resharded after forward, gathered again for backward (comm.fsdp_unit)
        fully_shard(unit if len(unit) > 1 else unit[0], reshard_after_forward=True, **options)
        heads.append(unit[0])
        taken |= {p for m in unit for p in m.parameters()}
    # the stage, FSDP's root, keeps what is left (the final norm) gathered from forward to
    # backward: FSDP2's default for a root
    fully_shard(stage, ignored_params=taken, **options)
    for k, head in enumerate(heads):
        if k + 1 < len(heads):
            head.set_modules_to_forward_prefetch([heads[k + 1]])
        if k > 0:
            head.set_modules_to_backward_prefetch([heads[k - 1]])
    for head in heads + [stage]:
        head.set_force_sum_reduction_for_comms(True)
    return heads + [stage]
