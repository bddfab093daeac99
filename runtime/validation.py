"""Validation loss on a held-out split: the job's `val_fraction` of the dataset's windows (the last
ones) never reach training; every `val_every` steps the Trainer computes the mean loss over
`val_batches` global batches of them (the same ones each time), sharded over DP like training.

The loss is computed by the training step's own forward (the pipeline schedules run forward and
backward together); the gradients it leaves are discarded, and so are the MoE expert loads it
counted, so training after a validation is exactly training without it.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from plait.ir.datarecipe import held_out
from plait.ir.errors import PlaitError
from plait.ir.job import Data

from . import data as data_mod
from .moe_balance import bias_blocks


class Part:
    """Windows [first, first + count) of another source, renumbered from 0."""

    def __init__(self, source: data_mod.TokenSource, length: int, train: bool, fraction: float):
        self.source, self.vocab = source, source.vocab
        total = source.num_windows(length)
        held = held_out(total, fraction)
        self.first, self.count = (0, total - held) if train else (total - held, held)
        self.length = length

    def num_windows(self, length: int) -> int:
        if length != self.length:
            raise ValueError(f"split made for windows of {self.length} tokens, asked for {length}")
        return self.count

    def window(self, index: int, length: int) -> np.ndarray:
        return self.source.window(self.first + index, length)

    def positions(self, index: int, length: int) -> np.ndarray:
        return data_mod.window_positions(self.source, self.first + index, length)

    def loss_mask(self, index: int, length: int) -> np.ndarray:
        return data_mod.window_loss_mask(self.source, self.first + index, length)


def training_part(source: data_mod.TokenSource, data: Data, seq_len: int) -> data_mod.TokenSource:
    """What training may read: everything without validation, else all but the held-out tail."""
    if not data.val_every or data.synthetic:
        return source
    return Part(source, seq_len + 1, train=True, fraction=data.val_fraction)


def validation_loader(source: data_mod.TokenSource, data: Data, seq_len: int, global_batch: int,
                      dp_rank: int, dp_size: int, device,
                      what: str = "the dataset") -> Optional[data_mod.BatchLoader]:
    if not data.val_every:
        return None
    part = Part(source, seq_len + 1, train=False, fraction=data.val_fraction)
    if part.count < global_batch:
        raise PlaitError(f"the held-out split ({data.val_fraction:g} of {what}: {part.count} "
                         f"windows of {seq_len + 1} tokens) is smaller than one global batch of "
                         f"{global_batch}", hint="raise val_fraction or use a larger dataset")
    return data_mod.BatchLoader(part, seq_len, global_batch, data.seed, dp_rank=dp_rank,
                                dp_size=dp_size, device=device, packing=data_mod.Packing.of(data))


def validation_loaders(trainer) -> dict[str, data_mod.BatchLoader]:
    """{name: loader of its held-out split}: "data" for one dataset, every source of a blend by
    its name (each holds out the same fraction of its own windows); {} without validation."""
    data, plan, mesh = trainer.job.data, trainer.plan, trainer.mesh
    if not data.val_every:
        return {}
    if data.sources:  # the training loader reads each source's training part; its source is whole
        whole = {s.name: part.source for s, part in zip(data.sources, trainer.loader.sources)}
    else:
        whole = {"data": trainer.source}
    where = (plan.seq_len, plan.global_batch, mesh.coord("dp"), mesh.size("dp"), mesh.device)
    return {name: validation_loader(source, data, *where,
                                    what=f"source {name!r}" if data.sources else "the dataset")
            for name, source in whole.items()}


def validation_losses(trainer, loaders: dict[str, data_mod.BatchLoader],
                      batches: int) -> tuple[float, int, dict[str, float]]:
    """(mean loss over every held-out token, those tokens, {name: its own mean loss})."""
    per = {name: validation_loss(trainer, loader, batches) for name, loader in loaders.items()}
    tokens = sum(t for _, t in per.values())
    loss = sum(l * t for l, t in per.values()) / tokens
    return loss, tokens, {name: l for name, (l, _) in per.items()}


def validation_loss(trainer, loader: data_mod.BatchLoader, batches: int) -> tuple[float, int]:
    """Mean loss over the held-out split's first ``batches`` global batches (fewer when it holds
    fewer), and the tokens they cover."""
    batches = min(batches, loader.windows // loader.global_batch)
    total = 0.0
    for index in range(batches):
        trainer.dp.zero_grad()
        total += float(trainer.forward_backward(index, loader.local_batch(index)))
    trainer.dp.zero_grad()
    for block in bias_blocks(trainer.stage_modules):
        block.expert_load.zero_()  # validation tokens must not steer the expert biases
    return total / batches, batches * loader.global_batch * loader.seq_len
