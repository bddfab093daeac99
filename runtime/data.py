"""Token datasets: `plait data prepare` writes one, jobs read it memory-mapped.

A dataset is a Megatron indexed dataset (`.bin` + `.idx`, see ir/indexed.py; `plait data prepare`
writes one with `meta.json` naming its tokenizer); plait's older flat `tokens.bin` directories
still read. Documents lie back to back with EOS between them (Megatron's packing). Training samples are non-overlapping windows of seq_len + 1 tokens (inputs and the
next-token labels). Step t's global batch is a fixed slice of a seeded permutation of all windows
(a new permutation each epoch), and data-parallel rank d reads the d-th contiguous share of it, so
the union over DP is exactly the global batch a single device would see: the basis of the parity
tests. The byte-level tokenizer is the default; a Hugging Face tokenizer is used when named.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Protocol

import numpy as np
import torch

from plait.ir import legality
from plait.ir.errors import PlaitError
from plait.ir.indexed import LOSS_MASK_SUFFIX, IndexedDataset, prefix_of

from .data_prepare import (DATASET_KIND, META, PREFIX, ByteTokenizer, HFTokenizer,  # noqa: F401
                           Tokenizer, bundled_corpus, get_tokenizer, prepare)
from .packing import (Batch, Packing, deliver, packed_batch, positions_after_eos,  # noqa: F401
                      positions_from_starts, window_loss_mask, window_positions)

LEGACY_TOKENS = "tokens.bin"  # plait's first format: a flat token file + meta.json, no index


class TokenSource(Protocol):
    vocab: int

    def window(self, index: int, length: int) -> np.ndarray: ...

    def num_windows(self, length: int) -> int: ...


class MemmapTokens:
    """A dataset read through np.memmap (pages come in as windows are touched): a Megatron indexed
    dataset (a `plait data prepare` directory, or any PREFIX.bin/.idx pair), or plait's older flat
    `tokens.bin` directory. ``vocab`` is None for Megatron datasets without plait's meta.json:
    windows are then checked against the model's vocabulary as they are read."""

    def __init__(self, path: str | Path):
        root = Path(path)
        prefix = prefix_of(root)
        meta_file = (prefix.parent if prefix else root) / META
        self.meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        if prefix is not None:
            self.indexed: Optional[IndexedDataset] = IndexedDataset(prefix)
            self.tokens = self.indexed.tokens
        elif self.meta and (root / LEGACY_TOKENS).is_file():
            self.indexed = None
            dtype = np.dtype(self.meta["dtype"])
            if (root / LEGACY_TOKENS).stat().st_size < dtype.itemsize:  # np.memmap cannot map empty files
                raise PlaitError(f"dataset {root} is empty ({root / LEGACY_TOKENS} holds no tokens)")
            self.tokens = np.memmap(root / LEGACY_TOKENS, dtype=dtype, mode="r")
        else:
            raise PlaitError(f"no dataset at {root} (expected a Megatron PREFIX.bin/.idx pair or a "
                             f"directory from `plait data prepare`)",
                             hint="build one with `plait data prepare FILES -o DIR`")
        self.vocab = int(self.meta["vocab"]) if "vocab" in self.meta else None
        self._starts: Optional[np.ndarray] = None
        self.mask_tokens = self._loss_mask_dataset(prefix)

    @staticmethod
    def _loss_mask_dataset(prefix: Optional[Path]) -> Optional[np.ndarray]:
        """The loss mask `plait data prepare --chat` writes beside the tokens (PREFIX_loss_mask)."""
        if prefix is None:
            return None
        mask_prefix = Path(str(prefix) + LOSS_MASK_SUFFIX)
        if not Path(str(mask_prefix) + ".idx").is_file():
            return None
        return IndexedDataset(mask_prefix).tokens

    def num_windows(self, length: int) -> int:
        return (len(self.tokens) - 1) // (length - 1)

    def window(self, index: int, length: int) -> np.ndarray:
        start = index * (length - 1)
        return np.asarray(self.tokens[start:start + length], dtype=np.int64)

    def positions(self, index: int, length: int) -> np.ndarray:
        """Per-document positions of a window (runtime/packing.py): document starts from the
        index, or after each EOS in a flat dataset."""
        start = index * (length - 1)
        if self.indexed is None:
            return positions_after_eos(self.window(index, length), int(self.meta.get("eos", -1)))
        if self._starts is None:
            self._starts = self.indexed.document_starts()
        return positions_from_starts(self._starts, start, length)

    def loss_mask(self, index: int, length: int) -> np.ndarray:
        """1 where the loss counts a token (assistant turns); all ones without a mask dataset."""
        if self.mask_tokens is None:
            return np.ones(length, dtype=np.uint8)
        start = index * (length - 1)
        return np.asarray(self.mask_tokens[start:start + length], dtype=np.uint8)


class SyntheticTokens:
    """Seeded uniform random tokens: an option for benchmarks, never the default. For packing
    tests, ``document_length`` > 0 cuts each window into seeded random documents of about that
    mean length, and ``masked_fraction`` of the tokens (seeded) fall outside the loss mask."""

    def __init__(self, vocab: int, seed: int = 0, windows: int = 1 << 16,
                 document_length: int = 0, masked_fraction: float = 0.0):
        self.vocab, self.seed, self.windows = vocab, seed, windows
        self.document_length, self.masked_fraction = document_length, masked_fraction

    def positions(self, index: int, length: int) -> np.ndarray:
        if not self.document_length:
            return np.arange(length, dtype=np.int64)
        rng = np.random.default_rng((self.seed, index, 1))
        starts = np.flatnonzero(rng.random(length) < 1 / self.document_length)
        return positions_from_starts(starts, 0, length)

    def loss_mask(self, index: int, length: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, index, 2))
        return (rng.random(length) >= self.masked_fraction).astype(np.uint8)

    def num_windows(self, length: int) -> int:
        return self.windows

    def window(self, index: int, length: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, index))
        return rng.integers(0, self.vocab, size=length, dtype=np.int64)


class BatchLoader:
    """Deterministic global batches, sharded over data-parallel ranks."""

    def __init__(self, source: TokenSource, seq_len: int, global_batch: int, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1, device: torch.device = torch.device("cpu"),
                 packing: Packing = Packing()):
        self.packing = packing
        problem = legality.divides("global batch", global_batch, "dp", dp_size)
        if problem:
            raise PlaitError(problem)
        self.source, self.seq_len, self.global_batch = source, seq_len, global_batch
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.device = torch.device(device)  # where batches are delivered (the mesh's device)
        self.windows = source.num_windows(seq_len + 1)
        if self.windows < global_batch:
            raise PlaitError(f"the dataset holds {self.windows} windows of {seq_len + 1} tokens, "
                             f"fewer than one global batch of {global_batch}")

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).permutation(self.windows)

    def global_indices(self, step: int) -> np.ndarray:
        per_epoch = self.windows // self.global_batch  # drop the ragged tail of each epoch
        epoch, within = divmod(step, per_epoch)
        start = within * self.global_batch
        return self._order(epoch)[start:start + self.global_batch]

    def local_batch(self, step: int) -> Batch:
        """This DP rank's share of step `step`'s global batch."""
        share = self.global_batch // self.dp_size
        samples = [(self.source, i) for i in self.global_indices(step)]
        return packed_batch(self.packing, samples, slice(self.dp_rank * share,
                            (self.dp_rank + 1) * share), self.seq_len + 1, self.device)


class VocabChecked:
    """A source whose token ids are checked against the model's vocabulary window by window (a
    Megatron corpus carries no tokenizer metadata; an id past the embedding would crash a rank)."""

    def __init__(self, source: TokenSource, vocab: int, path: str):
        self.source, self.vocab, self.path = source, vocab, path

    def num_windows(self, length: int) -> int:
        return self.source.num_windows(length)

    def positions(self, index: int, length: int) -> np.ndarray:
        return window_positions(self.source, index, length)

    def loss_mask(self, index: int, length: int) -> np.ndarray:
        return window_loss_mask(self.source, index, length)

    def window(self, index: int, length: int) -> np.ndarray:
        rows = self.source.window(index, length)
        if len(rows) and int(rows.max()) >= self.vocab:
            raise PlaitError(f"dataset {self.path} holds token id {int(rows.max())}, beyond the "
                             f"model's vocabulary of {self.vocab}", hint="was it tokenized for "
                             "another model?")
        return rows


def open_source(path: Optional[str], vocab: int, synthetic: bool = False,
                seed: int = 0) -> TokenSource:
    if synthetic:
        return SyntheticTokens(vocab, seed)
    if path is None:
        raise PlaitError("the job names no dataset", hint="set data = \"DIR\" (from `plait data "
                         "prepare`) or use synthetic data")
    source = MemmapTokens(path)
    if source.vocab is None:  # a Megatron dataset from elsewhere: check the ids as they are read
        return VocabChecked(source, vocab, path)
    if source.vocab > vocab:
        raise PlaitError(f"dataset {path} uses a vocabulary of {source.vocab} tokens, more than "
                         f"the model's {vocab}")
    return source
