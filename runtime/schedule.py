"""One training step's forward and backward over the micro-batches of this rank.

With pp > 1 the step runs on torch.distributed.pipelining: one PipelineStage per local chunk (static
boundary shapes from the compiled program) and PyTorch's schedule — Schedule1F1B, or
ScheduleInterleaved1F1B when a rank holds several virtual stages, or ScheduleGPipe. With pp == 1
the micro-batches simply accumulate gradients. Either way the loss is averaged over micro-batches.

A packed batch of a document-masked program also has per-document ``positions``: every stage
reads them (each attention layer's mask), so they go to every stage as a keyword input, split
into micro-batches like the tokens (the pipelining schedules pass step kwargs to all stages).
A loss-masked batch's ``loss_scale`` (tokens / counted tokens of the global batch) multiplies
every micro-batch's loss, making the step's loss the mean over the counted tokens.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from plait.ir.errors import LayoutError
from plait.lowering import collectives as cc
from plait.lowering.compile import RankProgram
from plait.lowering.passes.split_pipeline import stage_name

from .mesh import Mesh

SINGLE_SCHEDULES = ("1f1b", "gpipe")  # torch.distributed.pipelining's one-stage-per-rank ones


def _meta(shape, dtype) -> torch.Tensor:
    """A meta tensor standing for a stage boundary value; activations carry gradients back."""
    return torch.empty(tuple(shape), dtype=dtype, device="meta",
                       requires_grad=dtype.is_floating_point)


def _stage_meta(program: RankProgram, chunk: int, n_micro: int):
    """Example input / output tensors of one chunk for one micro-batch (static stage metadata)."""
    in_shape, in_dtype, out_shape, out_dtype = program.stage_io[stage_name(chunk)]
    return _meta(in_shape, in_dtype), _meta(out_shape, out_dtype)


def schedule_class(kind: str, vpp: int):
    """torch.distributed.pipelining's schedule class. Imported here, not at module level: the
    package pulls in dynamo and DTensor (~2 CPU s per process), which a rank without a pipeline
    never needs."""
    from torch.distributed.pipelining.schedules import (Schedule1F1B, ScheduleGPipe,
                                                        ScheduleInterleaved1F1B)
    if vpp > 1:
        if kind not in ("interleaved", "1f1b"):
            raise LayoutError(f"schedule {kind!r} cannot run {vpp} virtual stages per rank",
                              hint="use the interleaved schedule")
        return ScheduleInterleaved1F1B
    if kind not in SINGLE_SCHEDULES:
        raise LayoutError(f"schedule {kind!r} is not available with one stage per rank; "
                          f"use one of {', '.join(SINGLE_SCHEDULES)}")
    return {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}[kind]


class _PlainModule(nn.Module):
    """A stage as torch's pipelining sees it. Given an FSDP module, the schedules gather the whole
    chunk before it computes (UNSHARD actions), keep it gathered and its gradients unsharded
    across micro-batches and reduce-scatter once after the last (set_requires_gradient_sync(False),
    set_reshard_after_backward(False)). plait's memory and cost models price FSDP per unit: each
    gathered just before it runs and its gradients reduce-scattered every micro-batch, which is
    what FSDP's own hooks do when the schedule runs the stage as a plain module."""

    def __init__(self, stage: nn.Module):
        super().__init__()
        self.stage = stage

    def forward(self, *args, **kwargs):
        return self.stage(*args, **kwargs)


class StepRunner:
    """Runs forward + backward of one step; returns the mean loss on ranks that compute it."""

    def __init__(self, program: RankProgram, mesh: Mesh, n_micro: int, loss_fn=None):
        self.program, self.mesh, self.n_micro = program, mesh, n_micro
        # (output, target) -> loss on the last stage; distillation passes its own
        self.base_loss = program.loss if loss_fn is None else loss_fn
        self.loss_scale = 1.0  # this step's, set by run()
        self.layout = program.plan.layout
        self.schedule = None
        if self.layout.pp > 1:
            self.schedule = self._pipeline_schedule()

    def _pipeline_schedule(self):
        from torch.distributed.pipelining import PipelineStage
        stages = []
        for chunk, module in self.program.local_modules():
            example_in, example_out = _stage_meta(self.program, chunk, self.n_micro)
            stages.append(PipelineStage(_PlainModule(module), chunk, self.program.num_chunks,
                                        self.mesh.device, input_args=example_in,
                                        output_args=example_out, group=self.mesh.groups["pp"]))
        cls = schedule_class(self.program.plan.schedule, self.layout.vpp)
        # Every rank passes the loss (it tells the schedule to run backward); the last stage calls it.
        loss_fn = self.loss_fn
        if self.layout.vpp > 1:  # ScheduleInterleaved1F1B takes every local stage
            return cls(stages, self.n_micro, loss_fn=loss_fn, scale_grads=True)
        return cls(stages[0], self.n_micro, loss_fn=loss_fn, scale_grads=True)

    def loss_fn(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.base_loss(output, target)
        return loss if self.loss_scale == 1.0 else loss * self.loss_scale

    def run(self, tokens: torch.Tensor, labels: torch.Tensor, positions: Optional[torch.Tensor] = None,
            loss_scale: float = 1.0) -> Optional[torch.Tensor]:
        self.loss_scale = loss_scale
        inputs = {} if positions is None else {"positions": positions}
        if self.schedule is None:
            return self._accumulate(tokens, labels, inputs)
        first = 0 in self.program.chunk_indices
        last = self.program.holds_loss
        losses: list[torch.Tensor] = []
        args = (tokens,) if first else ()
        kwargs = {"target": labels, "losses": losses, **inputs} if last else dict(inputs)
        with cc.guard("pipeline send/recv", "pp"):
            self.schedule.step(*args, return_outputs=False, **kwargs)
        if not last:
            return None
        return torch.stack([loss.detach() for loss in losses]).mean()

    def _accumulate(self, tokens: torch.Tensor, labels: torch.Tensor, inputs: dict) -> torch.Tensor:
        stage = self.program.stage(0)
        losses: list[torch.Tensor] = []
        micro_tokens = tokens.chunk(self.n_micro)
        micro_labels = labels.chunk(self.n_micro)
        micro_inputs = {k: v.chunk(self.n_micro) for k, v in inputs.items()}
        for i, (tok, lab) in enumerate(zip(micro_tokens, micro_labels)):  # FSDP reduce-scatters each
            loss = self.loss_fn(stage(tok, **{k: v[i] for k, v in micro_inputs.items()}), lab)
            # Unscaled backward, then divide the gradients, as the pipeline schedules do
            # (scale_grads): MoE aux losses attach a gradient of 1 per call, so scaling the loss
            # instead would leave them counted n_micro times.
            loss.backward()
            losses.append(loss.detach())
        for p in stage.parameters():
            if p.grad is not None:
                p.grad.div_(self.n_micro)
        return torch.stack(losses).mean()  # in the loss's dtype, as the pipeline path does
