"""PyTorch's own implementation of a plait layout, for `runtime_vs_torch.py` to time side by side.

The same reference model (`build_model`, same seed) parallelised the way a torchtitan user would:
  TP   DTensor `parallelize_module`: ColwiseParallel q/k/v/gate/up, RowwiseParallel o/down, a
       vocabulary-parallel embedding (RowwiseParallel) and LM head (ColwiseParallel, Shard(-1) logits
       into `loss_parallel` cross entropy); with sequence parallelism, SequenceParallel norms and
       PrepareModuleInput gathering the sequence before each mixer.
  PP   `torch.distributed.pipelining`: the model split by hand into the plan's chunks, one
       PipelineStage each, the plan's schedule and micro-batches.
  DP   DistributedDataParallel (replicated), DDP + ZeroRedundancyOptimizer (zero1 without TP / PP)
       or FSDP2 `fully_shard` as torchtitan applies it and plait shards: the embedding, each
       planner unit of layers (attention + MLP) and the head a unit of their own, then the chunk
       (fsdp; zero1 with TP or PP).
Then torch's clip_grad_norm_ arithmetic (norm over every group, as torchtitan does it with PP)
and the same AdamW. The mesh is (pp, dp, tp), tp fastest: the ranks plait's "tp-cp-ep-dp-pp" order
gives the same coordinates.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")


class Chunk(nn.Module):
    """Layers [first, last) of the reference model, with the embedding on the first chunk and the
    final norm + LM head on the last (the hand split of a pipeline)."""

    def __init__(self, model: nn.Module, first: int, last: int):
        super().__init__()
        n = len(model.layers)
        self.embed = model.embed if first == 0 else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in range(first, last)})
        self.final_norm = model.final_norm if last == n else None
        self.head = model.head if last == n else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        for layer in self.layers.values():
            x = layer(x)
        if self.head is not None:
            x = self.head(self.final_norm(x))
        return x


def _tied(chunk: Chunk) -> bool:
    """The head shares the embedding's weight (a tied model on one chunk): both stay with the
    chunk, as plait keeps them with the stage."""
    return chunk.embed is not None and chunk.head is not None and \
        chunk.head.weight is chunk.embed.weight


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def tp_plan(chunk: Chunk, sp: bool) -> dict:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                                   RowwiseParallel, SequenceParallel)

    stream = Shard(1) if sp else Replicate()  # the residual stream between TP regions
    plan = {}
    if chunk.embed is not None:
        plan["embed"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=stream)
    for name, layer in chunk.layers.items():
        path = f"layers.{name}"
        if sp:
            plan[f"{path}.norm"] = SequenceParallel()
            plan[f"{path}.mixer"] = PrepareModuleInput(input_layouts=(stream,),
                                                       desired_input_layouts=(Replicate(),))
        for proj in COLUMN:
            if hasattr(layer.mixer, proj):
                plan[f"{path}.mixer.{proj}"] = ColwiseParallel()
        for proj in ROW:
            if hasattr(layer.mixer, proj):
                plan[f"{path}.mixer.{proj}"] = RowwiseParallel(output_layouts=stream)
    if chunk.head is not None:
        if sp:
            plan["final_norm"] = SequenceParallel()
        plan["head"] = ColwiseParallel(input_layouts=stream, output_layouts=Shard(-1),
                                       use_local_output=False)
    return plan


def _local(t: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor's value (a loss_parallel loss), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class TorchLayout:
    """One rank's torch program of a layout: ``step(tokens, labels)`` runs forward, backward,
    gradient clipping and AdamW over the step's micro-batches; returns the mean loss (last stage)."""

    def __init__(self, model: nn.Module, plan, optimizer_spec, rank: int, unit_size: int = 1):
        from torch.distributed.device_mesh import init_device_mesh

        from plait.runtime.optim import adamw, param_groups

        layout = plan.layout
        if layout.pp > 1 and layout.dp > 1 and layout.dp_kind == "replicated":
            raise ValueError(f"torch's side of {layout} would need DDP around pipeline stages, "
                             "which this benchmark does not build: compare a zero1 or fsdp layout")
        self.layout, self.n_micro, self.clip = layout, plan.num_microbatches, optimizer_spec.grad_clip
        self.unit_size = unit_size  # layers per FSDP unit: planner.layouts.units' period
        self.mesh = init_device_mesh("cpu", (layout.pp, layout.dp, layout.tp),
                                     mesh_dim_names=("pp", "dp", "tp"))
        pp_rank = self.mesh["pp"].get_local_rank()
        bounds = [(s.first, s.last) for s in sorted(plan.stages, key=lambda s: (s.virtual, s.pp_rank))]
        self.chunk_ids = [v * layout.pp + pp_rank for v in range(layout.vpp)]
        self.chunks = [Chunk(model, *bounds[c]) for c in self.chunk_ids]
        for chunk in self.chunks:
            self._parallelize(chunk)
        self.params = [p for c in self.chunks for p in c.parameters()]
        named = [(n, p) for c in self.chunks for n, p in c.named_parameters()]
        self.optimizer = adamw(param_groups(named, optimizer_spec.weight_decay), optimizer_spec)
        if layout.dp > 1 and not self._sharded():
            self._wrap_ddp()
            if layout.dp_kind == "zero1":  # ZeRO-1: torch's ZeroRedundancyOptimizer over DDP
                self.optimizer = self._zero1(param_groups(named, optimizer_spec.weight_decay),
                                             optimizer_spec)
        self.schedule = self._pipeline(plan) if layout.pp > 1 else None
        self.last = len(bounds) - 1 in self.chunk_ids
        self.first = 0 in self.chunk_ids

    def _parallelize(self, chunk: Chunk) -> None:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import parallelize_module

        if self.layout.tp > 1:
            parallelize_module(chunk, self.mesh["tp"], tp_plan(chunk, self.layout.sp))
        if self.layout.dp > 1 and self._sharded():
            # torchtitan's recipe, the units plait shards: each resharded after forward, the
            # chunk (final norm) last; gloo has no AVG: sum, then FSDP divides
            layers = list(chunk.layers.values())
            units = [[chunk.embed]] if chunk.embed is not None and not _tied(chunk) else []
            units += [layers[i:i + self.unit_size] for i in range(0, len(layers), self.unit_size)]
            units += [[chunk.head]] if chunk.head is not None and not _tied(chunk) else []
            for unit in units:
                fully_shard(unit, mesh=self.mesh["dp"], reshard_after_forward=True)
            fully_shard(chunk, mesh=self.mesh["dp"])
            for module in units + [chunk]:
                (module[0] if isinstance(module, list) else module).set_force_sum_reduction_for_comms(True)

    def _pipeline(self, plan):
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import (Schedule1F1B, ScheduleGPipe,
                                                            ScheduleInterleaved1F1B)

        total = self.layout.pp * self.layout.vpp
        stages = [PipelineStage(chunk, c, total, torch.device("cpu"), group=self.mesh["pp"].get_group())
                  for c, chunk in zip(self.chunk_ids, self.chunks)]
        if self.layout.vpp > 1:
            return ScheduleInterleaved1F1B(stages, self.n_micro, loss_fn=cross_entropy, scale_grads=True)
        cls = ScheduleGPipe if plan.schedule == "gpipe" else Schedule1F1B
        return cls(stages[0], self.n_micro, loss_fn=cross_entropy, scale_grads=True)

    def _sharded(self) -> bool:
        """FSDP2 shards the DP side: for fsdp, and for zero1 with TP or PP, which torch's
        ZeroRedundancyOptimizer (over DDP) does not compose with (torchtitan uses FSDP2 there)."""
        kind = self.layout.dp_kind
        return kind == "fsdp" or (kind == "zero1" and (self.layout.tp > 1 or self.layout.pp > 1))

    def _zero1(self, groups: list[dict], spec):
        from torch.distributed.optim import ZeroRedundancyOptimizer

        from plait.runtime.adamw import optimizer_path

        path = optimizer_path(p for g in groups for p in g["params"])  # plait's AdamW's kernel
        zero = ZeroRedundancyOptimizer(groups[0]["params"], torch.optim.AdamW,
                                       process_group=self.mesh["dp"].get_group(), lr=spec.lr,
                                       betas=tuple(spec.betas), eps=spec.eps, fused=path.fused,
                                       foreach=path.foreach, weight_decay=groups[0]["weight_decay"])
        zero.add_param_group(groups[1])
        return zero

    def _wrap_ddp(self) -> None:
        """Replicated DP: DistributedDataParallel around the (single) chunk, after TP."""
        group = self.mesh["dp"].get_group()
        self.chunks = [nn.parallel.DistributedDataParallel(c, process_group=group) for c in self.chunks]

    def _loss_context(self):
        from torch.distributed.tensor.parallel import loss_parallel
        return loss_parallel() if self.layout.tp > 1 else nullcontext()

    def step(self, tokens: torch.Tensor, labels: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        with self._loss_context():
            loss = self._forward_backward(tokens, labels)
        self._clip()
        self.optimizer.step()
        return self._logged(loss)

    def _forward_backward(self, tokens, labels) -> torch.Tensor | None:
        """The mean loss over micro-batches on the last stage (None elsewhere)."""
        if self.schedule is not None:
            losses: list[torch.Tensor] = []
            kwargs = {"target": labels, "losses": losses} if self.last else {}
            self.schedule.step(*((tokens,) if self.first else ()), **kwargs)
            return torch.stack([_local(l.detach()) for l in losses]).mean() if self.last else None
        chunk, losses = self.chunks[0], []
        for i, (tok, lab) in enumerate(zip(tokens.chunk(self.n_micro), labels.chunk(self.n_micro))):
            sync = i == self.n_micro - 1
            ctx = chunk.no_sync() if (not sync and hasattr(chunk, "no_sync")) else nullcontext()
            if hasattr(chunk, "set_requires_gradient_sync"):
                chunk.set_requires_gradient_sync(sync)
            with ctx:
                loss = cross_entropy(chunk(tok), lab) / self.n_micro
                loss.backward()
            losses.append(_local(loss.detach()) * self.n_micro)
        return torch.stack(losses).mean()

    def _logged(self, loss: torch.Tensor | None) -> float:
        """The loss a training loop logs: averaged over DP, from the last pipeline stage."""
        value = loss.reshape(1) if loss is not None and self.mesh["tp"].get_local_rank() == 0 \
            else torch.zeros(1)
        dist.all_reduce(value)
        return float(value) / self.layout.dp

    def _clip(self) -> None:
        """torch.nn.utils' total norm and clip, the norm completed over the pipeline ranks."""
        by_mesh: dict = {}  # DTensor norms need one mesh per call (TP without SP mixes in plain ones)
        for p in self.params:
            if p.grad is not None:
                by_mesh.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
        norms = [_local(torch.nn.utils.get_total_norm(g, 2.0)) for g in by_mesh.values()]
        norm = torch.stack(norms).norm()
        if self.layout.pp > 1:
            square = norm ** 2
            dist.all_reduce(square, group=self.mesh["pp"].get_group())
            norm = square.sqrt()
        if self.clip > 0:  # clip_grads_with_norm_'s arithmetic, one mesh at a time
            coef = float(torch.clamp(self.clip / (norm + 1e-6), max=1.0))
            for grads in by_mesh.values():
                torch._foreach_mul_(grads, coef)
