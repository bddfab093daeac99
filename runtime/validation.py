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

from plait.ir.errors import PlaitError
from plait.ir.job import Data

from . import data as data_mod
from .moe_balance import bias_blocks


def held_out(windows: int, fraction: float) -> int:
    """Windows kept for validation out of ``windows`` (0 without validation)."""
    return int(windows * fraction) if fraction > 0 else 0


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
                      dp_rank: int, dp_size: int, device) -> Optional[data_mod.BatchLoader]:
    if not data.val_every:
        return None
    part = Part(source, seq_len + 1, train=False, fraction=data.val_fraction)
    if part.count < global_batch:
        raise PlaitError(f"the held-out split ({data.val_fraction:g} of the dataset: {part.count} "
                         f"windows of {seq_len + 1} tokens) is smaller than one global batch of "
                         f"{global_batch}", hint="raise val_fraction or use a larger dataset")
    return data_mod.BatchLoader(part, seq_len, global_batch, data.seed, dp_rank=dp_rank,
                                dp_size=dp_size, device=device, packing=data_mod.Packing.of(data))


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
