"""Packed batches: documents back to back in each window, kept apart by attention and the loss.

Training windows are cut from a token stream in which documents lie back to back with EOS
between them (Megatron's packing). Two options of the job's data say what a window carries
besides its tokens (`Packing.of(job.data)`):

- ``document_mask``: each input token's position within its document, restarting at 0 at every
  document start *and at the window's first token* (Megatron's reset_position_ids: a document
  continued from the previous window counts from 0, so RoPE never sees a position past seq_len).
  Document starts come from the dataset's index (Megatron .idx document boundaries); a flat
  dataset without an index restarts after each EOS; synthetic data is one document per window.
  The model attends within documents only (`document_attention`).
- ``loss_mask`` (the SFT objective): labels whose token the dataset's loss mask excludes (the
  prompt, the system and user turns) become IGNORE_INDEX, and the batch's ``loss_scale`` is the
  global batch's tokens / counted tokens, so the step's loss is the mean over counted tokens of
  the whole global batch, whatever the layout splits it into (the basis of the parity tests).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from plait.ir.job import Data
from plait.lowering.modules.model import IGNORE_INDEX


@dataclass(frozen=True)
class Batch:
    tokens: torch.Tensor  # [n, seq] int64
    labels: torch.Tensor  # [n, seq] int64; IGNORE_INDEX where the loss mask excludes the token
    positions: Optional[torch.Tensor] = None  # [n, seq] int64 per-document positions (document_mask)
    loss_scale: float = 1.0  # global tokens / counted tokens (loss_mask); 1 otherwise


@dataclass(frozen=True)
class Packing:
    document_mask: bool = False
    loss_mask: bool = False

    @staticmethod
    def of(data: Data) -> "Packing":
        return Packing(document_mask=data.document_mask, loss_mask=data.objective == "sft")


def positions_from_starts(starts: np.ndarray, first: int, length: int) -> np.ndarray:
    """Positions of tokens first .. first + length - 1 of a stream whose documents begin at the
    sorted token offsets ``starts``; the window's first token starts a document too."""
    index = np.arange(first, first + length, dtype=np.int64)
    if not len(starts):
        return index - first
    at = np.searchsorted(starts, index, side="right") - 1
    begin = np.where(at >= 0, starts[np.maximum(at, 0)], first)
    return index - np.maximum(begin, first)


def positions_after_eos(tokens: np.ndarray, eos: int) -> np.ndarray:
    """Positions restarting after every EOS token (which ends its document) and at the start."""
    starts = np.flatnonzero(tokens[:-1] == eos) + 1
    return positions_from_starts(np.concatenate([[0], starts]), 0, len(tokens))


def window_positions(source, index: int, length: int) -> np.ndarray:
    read = getattr(source, "positions", None)
    return read(index, length) if read is not None else np.arange(length, dtype=np.int64)


def window_loss_mask(source, index: int, length: int) -> np.ndarray:
    read = getattr(source, "loss_mask", None)
    return read(index, length) if read is not None else np.ones(length, dtype=np.uint8)


def packed_batch(packing: Packing, samples: Sequence[tuple[object, int]], share: slice,
                 length: int, device: torch.device) -> Batch:
    """The DP share ``share`` of a global batch given as (source, window index) samples."""
    mine = samples[share]
    rows = np.stack([src.window(int(i), length) for src, i in mine])
    positions = np.stack([window_positions(src, int(i), length)[:-1] for src, i in mine]) \
        if packing.document_mask else None
    counted, scale = None, 1.0
    if packing.loss_mask:  # the whole global batch's mask: the normaliser is global
        masks = np.stack([window_loss_mask(src, int(i), length)[1:] for src, i in samples])
        total = int(masks.sum())
        scale = masks.size / total if total else 0.0
        counted = masks[share]
    return deliver(rows, device, positions, counted, scale)


def deliver(rows: np.ndarray, device: torch.device, positions: Optional[np.ndarray] = None,
            counted: Optional[np.ndarray] = None, loss_scale: float = 1.0) -> Batch:
    """Windows of seq_len + 1 tokens -> inputs and next-token labels on the mesh's device;
    ``counted`` [n, seq]: which labels the loss counts."""
    data = torch.from_numpy(rows)
    labels = data[:, 1:]
    if counted is not None:
        labels = torch.where(torch.from_numpy(counted.astype(bool)), labels, IGNORE_INDEX)
    pos = None if positions is None else torch.from_numpy(np.ascontiguousarray(positions))
    tensors = [data[:, :-1].contiguous(), labels.contiguous()] + ([pos] if pos is not None else [])
    if device.type == "cuda":  # pinned host-to-device copies
        tensors = [t.pin_memory().to(device, non_blocking=True) for t in tensors]
    return Batch(tokens=tensors[0], labels=tensors[1],
                 positions=tensors[2] if pos is not None else None, loss_scale=loss_scale)
